"""The LightningModule: random states in checkpoints, the lm loss through the chunked head, the schedule."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_stage

from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.training.module import LanguageModel


def test_a_checkpoint_restores_every_random_generator():
    """on_save_checkpoint stores Python's, NumPy's and torch's generators; a resumed module puts them back at
    on_train_start, so that the next random numbers (dropout, sampling) are those of the uninterrupted run."""
    import random
    from functools import partial
    from types import SimpleNamespace

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    saved, checkpoint = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1), {}
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved.on_save_checkpoint(checkpoint)
    expected = draws()

    torch.manual_seed(9), random.seed(9), np.random.seed(9)  # a new process: other states
    resumed = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    resumed.on_load_checkpoint(checkpoint)
    resumed.trainer = SimpleNamespace(world_size=1, global_rank=0)
    resumed.on_train_start()
    assert draws() == expected


def test_the_chunked_head_and_loss_give_the_plain_loss_and_gradients():
    """The language-modelling stages' loss through GPT.hidden + the chunked head equals the plain path through the
    logits, on a GPT with a tied head (the embedding gets both gradients)."""
    from llmtrain.stages.pretrain import lm_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True))
    batch = {"input_ids": torch.randint(0, 97, (3, 16)), "labels": torch.randint(0, 97, (3, 16))}
    batch["labels"][1, :5] = -100
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        loss, n = lm_loss(model, batch, chunk)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (plain, n_plain, grads_plain), (chunked, n_chunked, grads_chunked) = results
    assert n_plain == n_chunked == 43
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_chunked[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def logged_eval_end(module: LanguageModel, mine: dict, other_rank: dict, prefix: str = "val") -> dict[str, float]:
    """Run the end-of-evaluation reduction of `module` as rank 0 of two: `mine` are this rank's sums, `other_rank`
    the second rank's; the strategy's all-reduce adds them. Returns what the module logged."""
    from types import SimpleNamespace

    class TwoRanks:
        def reduce(self, value, reduce_op):
            assert reduce_op == "sum"
            return value + other_rank[next(k for k, v in mine.items() if v is value)]

    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module._trainer = SimpleNamespace(strategy=TwoRanks())
    module._eval = dict(mine)
    module._eval_end(prefix)
    return logged


def test_evaluation_metrics_pool_the_sums_of_uneven_ranks():
    """Two ranks with 2 and 10 loss tokens: val/loss is the mean over all 12 tokens (40 / 12), not the mean of the
    two ranks' means ((5 + 3) / 2); a classifier's accuracy pools the confusion matrices the same way."""
    import math
    from functools import partial

    from llmtrain.stages.classify import Classify

    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    d = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    lm = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    logged = logged_eval_end(lm, {"loss": d(10.0), "count": d(2.0)}, {"loss": d(30.0), "count": d(10.0)})
    assert logged["val/loss"] == pytest.approx(40 / 12) and logged["val/ppl"] == pytest.approx(math.exp(40 / 12))

    cls = LanguageModel(model, Classify(train_blocks="all", lora=None), partial(torch.optim.AdamW), 0, 10, 0.1)
    mine = {"loss": d(1.0), "count": d(1.0), "confusion": d([[1.0, 0.0], [0.0, 0.0]])}  # 1 of 1 right
    other = {"loss": d(9.0), "count": d(9.0), "confusion": d([[0.0, 0.0], [9.0, 0.0]])}  # 0 of 9 right
    logged = logged_eval_end(cls, mine, other, prefix="test")
    assert logged["test/acc"] == pytest.approx(0.1) and logged["test/loss"] == pytest.approx(1.0)


def test_resume_apply_gives_the_optimizer_the_new_settings_and_keeps_its_moments():
    """resume.apply=[optimizer...]: a checkpoint's saved groups would otherwise win over the new lr silently."""
    from functools import partial

    from llmtrain.training.optim import lr_factor

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    old = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
                        8, 10, 0.1)
    setup = old.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    for _ in range(3):
        model(torch.randint(0, 50, (2, 8))).sum().backward()
        optimizer.step(), schedule.step()
    assert lr_factor(3, 8, 10, 0.1) == 0.5  # in the warmup: the lr is not the peak
    checkpoint = {"state_dict": {}, "optimizer_states": [optimizer.state_dict()],
                  "lr_schedulers": [schedule.state_dict()]}
    moments = {k: v["exp_avg"].clone() for k, v in checkpoint["optimizer_states"][0]["state"].items()}
    new = partial(torch.optim.AdamW, lr=4e-3, betas=(0.8, 0.9), weight_decay=0.2)
    LanguageModel(model, lm_stage(), new, 8, 10, 0.1).on_load_checkpoint(copy := {**checkpoint})  # not asked: as saved
    assert copy["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3 * lr_factor(3, 8, 10, 0.1))
    LanguageModel(model, lm_stage(), new, 8, 10, 0.1, new_optimizer_settings=True).on_load_checkpoint(checkpoint)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert decayed and all(g["weight_decay"] == 0.2 for g in decayed)  # the no-decay group stays at 0
    assert all(g["betas"] == (0.8, 0.9) and g["initial_lr"] == 4e-3 for g in groups)
    assert all(g["lr"] == pytest.approx(4e-3 * lr_factor(3, 8, 10, 0.1)) for g in groups)  # same point, new peak
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [4e-3] * len(groups)
    state = checkpoint["optimizer_states"][0]["state"]
    assert all(torch.equal(state[k]["exp_avg"], m) for k, m in moments.items())  # the moments go on


def test_on_resume_each_rank_takes_its_own_random_generators():
    """A checkpoint of two ranks holds two sets of generators: rank 1 resumes with the second, not rank 0's."""
    import random

    from llmtrain.training.resume import rng_states

    torch.manual_seed(1), random.seed(1)
    rank0 = rng_states()
    torch.manual_seed(2), random.seed(2)
    rank1 = rng_states()
    expected = torch.rand(3).tolist(), random.random()

    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    resumed = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    resumed.on_load_checkpoint({"state_dict": {}, "llmtrain_resume": {"rng": [rank0, rank1], "nonfinite_steps": 0}})
    resumed.trainer = SimpleNamespace(world_size=2, global_rank=1)
    torch.manual_seed(9), random.seed(9)
    resumed.on_train_start()
    assert (torch.rand(3).tolist(), random.random()) == expected


def two_identical_ranks(module: LanguageModel, strategy=None, log_every_n_steps: int = 1) -> list[tuple]:
    """Make `module` rank 0 of two whose other rank holds the same batches (so that the all-reduces double what this
    rank has, and DDP's average of the gradients leaves them as they are). Returns what it logs: (step, name, value)."""

    if strategy is None:
        strategy = SimpleNamespace()
    strategy.reduce = lambda value, reduce_op: value * 2
    strategy.all_gather = lambda t: torch.stack([t, t])
    logged = []
    module.trainer = SimpleNamespace(world_size=2, global_step=0, accumulate_grad_batches=1, strategy=strategy,
                                     log_every_n_steps=log_every_n_steps, precision_plugin=SimpleNamespace(scaler=None))
    module.log = lambda name, value, **kw: logged.append((module.trainer.global_step, name,
                                                           torch.as_tensor(value).item()))
    return logged


def lm_batch(seed: int, masked: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, 50, (2, 8), generator=g),
             "labels": torch.randint(0, 50, (2, 8), generator=g)}
    batch["labels"][0, :masked] = -100
    return batch


@pytest.mark.parametrize("counts_vary", [False, True])
def test_each_step_gets_the_gradient_of_its_mean_loss_over_every_rank(counts_vary):
    """Two steps on two ranks with the same batches: after on_before_optimizer_step the gradients are those of the
    mean loss over the step's labelled tokens, whether the stage counts the units of every rank (an all-reduce) or
    multiplies its own by the number of ranks; the second step counts its own units only."""

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    stage = lm_stage()
    stage.counts_vary = counts_vary
    module = LanguageModel(model, stage, partial(torch.optim.SGD), 0, 10, 0.1)
    two_identical_ranks(module)
    for step, batch in enumerate([lm_batch(0, masked=3), lm_batch(1, masked=6)]):
        module.trainer.global_step = step
        model.zero_grad()
        expected = torch.autograd.grad(F.cross_entropy(model(batch["input_ids"]).flatten(0, 1),
                                                       batch["labels"].flatten(), ignore_index=-100),
                                       list(model.parameters()))
        module.training_step(batch, 0).backward()
        module.on_before_optimizer_step(None)
        for (name, p), grad in zip(model.named_parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, grad, atol=1e-6, rtol=1e-5, msg=f"step {step}: {name}")


def test_the_gradient_norm_is_logged_on_lightnings_logging_steps_and_over_every_shard():
    """Lightning logs after step s when (s + 1) is a multiple of log_every_n_steps; under FSDP each rank holds a
    shard of the gradients, so the norm is the root of the sum of the ranks' squared norms."""
    from lightning.pytorch.strategies import FSDPStrategy

    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    module = LanguageModel(model, lm_stage(), partial(torch.optim.SGD), 0, 10, 0.1)
    logged = two_identical_ranks(module, FSDPStrategy(), log_every_n_steps=2)
    numel = sum(p.numel() for p in model.parameters())
    for step in range(4):
        module.trainer.global_step = step
        for p in model.parameters():
            p.grad = torch.full_like(p, 1.0 / 1024)  # summed losses over LOSS_SCALE, 1 unit on each rank
        module._step_units = torch.tensor(1.0)
        module.on_before_optimizer_step(None)
    assert [(step, name) for step, name, _ in logged] == [(1, "train/grad_norm"), (3, "train/grad_norm")]
    assert logged[0][2] == pytest.approx(math.sqrt(2 * numel))  # 1 per element on 2 ranks, not 2 * sqrt(numel)


def test_evaluation_adds_the_sums_of_every_batch():
    """val/loss over two batches of 13 and 10 labelled tokens is their pooled mean, not the last batch's."""


    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1)).eval()
    module = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda value, reduce_op: value))
    batches = [lm_batch(0, masked=3), lm_batch(1, masked=6)]
    module.on_test_epoch_start()
    with torch.no_grad():
        for batch in batches:
            module.test_step(batch, 0)
        module.on_test_epoch_end()
        logits = torch.cat([model(b["input_ids"]) for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert logged["test/loss"] == pytest.approx(expected.item(), rel=1e-6)
