"""Benchmark tasks during training: the callback scores what `python -m llmtrain.evaluate`'s function scores on the
same weights, its shares of the documents add up to the whole, the model comes back in training mode, and a run's
eval/ values reach its logger and metrics.json."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.interop.harness import GPTHarnessLM
from llmtrain.interop.harness_sums import aggregations_of, metrics_of, shard_sums
from llmtrain.interop.harness_tasks import load_tasks, run_tasks
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.training.evaluation import TaskEvaluation

TASKS = ["llmtrain_definitions", "llmtrain_perplexity"]
LIMIT = 7  # an odd number of documents: two ranks get 4 and 3


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)  # bytes: a cheap head; a context of 256 holds the longest choice (200 bytes) and its prompt
    return GPT(GPTConfig(vocab_size=257, context_length=256, emb_dim=16, n_heads=2, n_layers=1))


def evaluated(gpt: GPT) -> tuple[dict[str, float], TaskEvaluation]:
    callback = TaskEvaluation(TASKS, tokenizer="bytes", limit=LIMIT, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, precision="32-true")
    module = SimpleNamespace(gpt=gpt, device=torch.device("cpu"))
    callback.setup(trainer, module, "fit")
    return callback.evaluate(trainer, module), callback


def test_the_callback_scores_what_evaluate_scores_and_leaves_the_model_training(gpt):
    gpt.train()
    metrics, callback = evaluated(gpt)
    assert gpt.training and all(p.grad is None for p in gpt.parameters())
    lm = GPTHarnessLM(gpt, build_tokenizer("bytes"), batch_size=8)
    results = run_tasks(lm, load_tasks(TASKS), limit=LIMIT, bootstrap_iters=0)["results"]
    expected = {f"eval/{task}/{key.split(',')[0]}": value for task, values in results.items()
                for key, value in values.items() if key.endswith(",none") and "_stderr" not in key}
    assert sorted(metrics) == sorted(expected) and len(metrics) == 5  # acc, acc_norm and the three of perplexity
    assert metrics == pytest.approx(expected, rel=1e-9)
    assert callback.evaluated_at == 0 and len(callback.seconds) == 1
    assert callback.chance == {"llmtrain_definitions": 0.25}  # four choices each; the perplexity task has none
    acc = metrics["eval/llmtrain_definitions/acc"]
    assert callback.summary(metrics) == f"llmtrain_definitions acc {acc:.4f} (chance 0.25)"


def test_two_ranks_shares_add_up_to_the_scores_of_one(gpt):
    tasks, _ = load_tasks(TASKS)
    lm = GPTHarnessLM(gpt, build_tokenizer("bytes"), batch_size=8)
    one = shard_sums(lm, tasks, LIMIT)
    shares = [shard_sums(lm, tasks, LIMIT, rank=r, world_size=2) for r in (0, 1)]
    added = {k: tuple(a + b for a, b in zip(shares[0][k], shares[1][k])) for k in one}
    flat = lambda sums: {f"{k}/{i}": v for k, pair in sums.items() for i, v in enumerate(pair)}  # noqa: E731
    assert shares[0]["llmtrain_definitions/acc"][1] == 4 and shares[1]["llmtrain_definitions/acc"][1] == 3
    assert flat(added) == pytest.approx(flat(one), rel=1e-9)
    aggregations = aggregations_of(tasks)
    assert metrics_of(added, aggregations) == pytest.approx(metrics_of(one, aggregations), rel=1e-9)


class Recorder:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


def hooks_at(every_n_steps, steps, monkeypatch) -> tuple[list, list]:
    """(what reached the logger from the training steps, what pl_module.log got at the validations) of a run
    validated at steps 2 and 4 (max_steps 4) whose evaluation returns the step."""
    callback, logger, logged = TaskEvaluation(TASKS, "bytes", every_n_steps=every_n_steps), Recorder(), []

    def evaluate(trainer, module):
        callback.evaluated_at = trainer.global_step
        return {"eval/t/acc": float(trainer.global_step)}

    monkeypatch.setattr(callback, "evaluate", evaluate)
    module = SimpleNamespace(log_dict=lambda metrics, **kw: logged.append(metrics))
    trainer = SimpleNamespace(global_step=0, max_steps=4, sanity_checking=True, loggers=[logger], is_global_zero=True,
                              state=SimpleNamespace(fn="fit"))
    callback.on_validation_epoch_end(trainer, module)  # the sanity check: nothing
    trainer.sanity_checking = False
    for step in steps:  # micro-batches: a step repeats while gradients accumulate
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)
        if step in (2, 4):
            callback.on_validation_epoch_end(trainer, module)
    return logger.logged, logged


def test_the_callback_evaluates_at_each_validation_or_every_n_steps_and_at_the_end(monkeypatch):
    steps = [0, 1, 1, 2, 2, 3, 3, 4]
    assert hooks_at(None, steps, monkeypatch) == ([], [{"eval/t/acc": 2.0}, {"eval/t/acc": 4.0}])
    # every 1 step: to the loggers at once (Lightning's log_every_n_steps would drop them), the last one at the final
    # validation (pl_module.log: what metrics.json reads), each step once
    assert hooks_at(1, steps, monkeypatch) == ([(1, {"eval/t/acc": 1.0}), (2, {"eval/t/acc": 2.0}),
                                                (3, {"eval/t/acc": 3.0})], [{"eval/t/acc": 4.0}])
    assert hooks_at(3, steps, monkeypatch) == ([(3, {"eval/t/acc": 3.0})], [{"eval/t/acc": 4.0}])
