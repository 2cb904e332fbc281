"""The Optuna preset (conf/hparams_search/optuna.yaml): a real 3-trial sweep of the tiny model from the command line."""

from pathlib import Path

import pytest
import yaml
from conftest import TINY, read_scalars, run_cli

pytestmark = pytest.mark.slow


def swept_lr(job: Path) -> float:
    """The optimizer.lr that the sweeper chose for this job (from Hydra's record of its overrides)."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next(float(o.split("=", 1)[1]) for o in overrides if o.startswith("optimizer.lr="))


def test_optuna_sweep_minimises_the_final_val_loss(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", *TINY,
                      "trainer.max_steps=6", "trainer.val_check_interval=6"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]

    finals = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        finals.append(sorted(read_scalars(job)["val/loss"])[-1][1])  # the last val/loss: what the job returned
    lrs = [swept_lr(job) for job in jobs]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and len(set(lrs)) == 3  # a learning rate chosen per trial

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert results["best_value"] == pytest.approx(min(finals), rel=1e-5)
    assert results["best_params"]["optimizer.lr"] == pytest.approx(lrs[finals.index(min(finals))], rel=1e-9)
    assert "data.batch_size" not in results["best_params"]  # fixed on the command line, so not searched
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
