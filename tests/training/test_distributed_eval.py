"""Exact evaluation on any number of ranks: 1 and 2 CPU ranks (gloo, through the command line) give the same
val/test metrics on sets whose size does not divide by 2, for a language model and a classifier, and the same
benchmark scores during training (eval=quick), which reach TensorBoard and MLflow alike."""

import json

import pytest
import torch
from conftest import TINY, compose, read_scalars, run_cli

from llmtrain.interop.checkpoints import read_info
from llmtrain.run.train import train

pytestmark = pytest.mark.slow  # real runs, two of them DDP

# AdamW at lr 0: the weights never move, so that both runs evaluate the same model (Muon's AdamW groups have lrs
# of their own); 100 documents hold 41 validation windows of 33 tokens (21 + 20 on two ranks), the shipped
# classify splits 279 (val) and 314 (test) texts
FIXED = ["optimizer=adamw", "optimizer.lr=0", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=null", "trainer.precision=32-true"]  # fp32 on any CPU: sums differ in order only
# eval=quick on 9 documents a task (5 and 4 on two ranks); a model context of 256 bytes holds the longest choice of
# the multiple-choice task, while training keeps windows of 32
EVAL = ["eval=quick", "eval.limit=9", "model.context_length=256", "data.context_length=32"]
LM = [*TINY, *FIXED, "data.max_documents=100", *EVAL]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
TRACKERS = ["logger=many", "~logger.csv", "~logger.wandb"]  # TensorBoard and MLflow (its SQLite store in outputs/)
SCORES = ("eval/llmtrain_definitions/acc", "eval/llmtrain_definitions/acc_norm",
          "eval/llmtrain_perplexity/bits_per_byte", "eval/llmtrain_perplexity/byte_perplexity",
          "eval/llmtrain_perplexity/word_perplexity")


def final(run_dir, tags: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each tag."""
    scalars = read_scalars(run_dir)
    return {tag: max(scalars[tag])[1] for tag in tags}


def two_ranks(args: list[str], run_dir) -> str:
    result = run_cli([*args, *DDP, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    return out


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    train(compose(LM, root / "one"))
    out = two_ranks([*LM, *TRACKERS], root / "two")
    return root, out


def test_language_model_metrics_are_the_same_on_one_and_two_ranks(lm_runs):
    root, _ = lm_runs
    one, two = (final(root / name, ("val/loss", "val/ppl")) for name in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-6)


def test_benchmark_scores_during_training_are_the_same_on_one_and_two_ranks_in_tensorboard_and_mlflow(lm_runs):
    from mlflow import MlflowClient

    root, out = lm_runs
    one, two = (final(root / name, SCORES) for name in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-6)
    assert one["eval/llmtrain_definitions/acc"] in {i / 9 for i in range(10)}  # a share of the 9 documents
    written = [json.loads((root / name / "metrics.json").read_text()) for name in ("one", "two")]
    assert {tag: written[0][tag] for tag in SCORES} == pytest.approx(one, rel=1e-6)  # the final scores
    assert written[1] == pytest.approx(written[0], rel=1e-6)
    assert "eval at step 2: llmtrain_definitions/acc" in out and "s per evaluation)" in out
    assert "self.log('eval/" not in out  # no warning of Lightning's about the scores: they are reduced already
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("llmtrain").experiment_id])
    board = read_scalars(root / "two")
    for tag in SCORES:  # the same run's curve in both trackers
        history = client.get_metric_history(run.info.run_id, tag)
        assert [m.step for m in history] == [s for s, _ in board[tag]] and len(history) == 1, tag
        assert [m.value for m in history] == pytest.approx([v for _, v in board[tag]], rel=1e-6), tag


def test_classifier_metrics_are_the_same_on_one_and_two_ranks(lm_runs):
    """The classify stage from the LM's checkpoint, with a dropout rate and a shorter context than the checkpoint's:
    both are applied to the model (and recorded in its checkpoint), neither changes an evaluation."""
    root, _ = lm_runs
    args = ["finetune=classify", f"init_from={root / 'one'}", *FIXED, "trainer.accelerator=cpu",
            "callbacks.progress_bar=null", "data.batch_size=16", "model.drop_rate=0.1", "model.context_length=24"]
    train(compose(args, root / "cls-one"))
    out = two_ranks(args, root / "cls-two")
    tags = ("val/loss", "val/acc", "val/f1", "test/acc", "test/f1")
    one, two = final(root / "cls-one", tags), final(root / "cls-two", tags)
    assert two == pytest.approx(one, rel=1e-6)
    assert 0 < one["test/acc"] < 1 and "test/acc" in out
    info = read_info(root / "cls-two" / "checkpoints" / "last.ckpt", "last.ckpt")
    assert info.model_config.drop_rate == 0.1 and info.model_config.context_length == 24
    exported = torch.load(root / "cls-one" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert exported["model.pos_emb.weight"].shape[0] == 24


def test_no_checkpoint_is_read_or_written_without_saying_weights_only(lm_runs):
    _, out = lm_runs
    assert "done: 2 steps" in out and "weights_only" not in out
