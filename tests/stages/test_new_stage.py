"""A new stage is one Python file and one YAML: a stage written outside the package, with a config of its own,
trains from the real command line with nothing else changed."""

import json

import pytest
import torch
from conftest import TINY, read_scalars, run_cli

STAGE = '''
import torch

from llmtrain.stages.pretrain import Pretrain, lm_loss


class TokenAccuracy(Pretrain):
    """Pretraining that also reports how often the likeliest next token is the right one."""

    name = "token_accuracy"
    metrics = ("loss", "ppl", "acc")

    def eval_sums(self, model, batch):
        sums = super().eval_sums(model, batch)
        logits, labels = model(batch["input_ids"]), batch["labels"]
        right = ((logits.argmax(dim=-1) == labels) & (labels != -100)).sum()
        return sums | {"right": right.double()}

    def eval_metrics(self, totals):
        return super().eval_metrics(totals) | {"acc": (totals["right"] / totals["count"].clamp(min=1)).float()}

    def summary(self, metrics, datamodule):
        return super().summary(metrics, datamodule) + f", val/acc {metrics['val/acc']:.4f}"
'''

CONFIG = '''# @package _global_
defaults:
  - pretrain
  - _self_

finetune:
  _target_: token_accuracy.TokenAccuracy
'''


@pytest.mark.slow
def test_a_stage_of_ones_own_trains_from_the_command_line(tmp_path):
    (tmp_path / "token_accuracy.py").write_text(STAGE)
    (tmp_path / "conf" / "finetune").mkdir(parents=True)
    (tmp_path / "conf" / "finetune" / "token_accuracy.yaml").write_text(CONFIG)
    run = tmp_path / "run"
    out = run_cli(["--config-dir", str(tmp_path / "conf"), "finetune=token_accuracy", *TINY, "trainer.max_steps=10",
                   "trainer.val_check_interval=5", f"hydra.run.dir={run}"], cwd=tmp_path, extra_paths=(tmp_path,))
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 10 steps, val/loss") and ", val/acc " in last
    accuracy = [v for _, v in read_scalars(run)["val/acc"]]
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["llmtrain"]
    assert saved["stage"] == "token_accuracy"
    assert json.loads((run / "hf" / "llmtrain.json").read_text())["stage"] == "token_accuracy"
