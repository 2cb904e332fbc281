"""Preemption under 2 CPU DDP ranks (real processes): SIGTERM inside an accumulation window and SIGUSR1 during
validation each save last.ckpt at a window end, SIGUSR1 requeues a SLURM job from rank zero only, and
ckpt_path=auto resumes to final weights bit-identical to an uninterrupted run."""

import os
import stat

import pytest
import torch
from conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

# 2 ranks, windows of 2 micro-batches, dropout (the random state matters), validation every 4 batches (after steps
# 2 and 4), 6 optimizer steps; saves only at the end unless a signal comes
RUN = [*TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accumulate_grad_batches=2",
       "model.drop_rate=0.1", "trainer.max_steps=6", "trainer.val_check_interval=4", "trainer.limit_val_batches=3",
       "checkpoint_every=100", "trainer.precision=32-true"]


def run(args: list[str], run_dir):
    result = run_cli([*RUN, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=400,
                     extra_paths=(ROOT / "tests",))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"step": ckpt["global_step"], **ckpt["state_dict"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run([], run_dir)
    return weights(run_dir)


def signal_at(name: str, batch: int, rank: int, validation: bool = False) -> list[str]:
    return ["+callbacks.signal._target_=signals.SignalAt", f"+callbacks.signal.signal_name={name}",
            f"+callbacks.signal.batch={batch}", f"+callbacks.signal.rank={rank}",
            f"+callbacks.signal.validation={str(validation).lower()}"]


def test_sigterm_in_a_window_and_sigusr1_in_validation_save_and_resume_bit_identical(tmp_path, uninterrupted,
                                                                                    monkeypatch):
    """SIGTERM to rank 1 at batch 4 (the first of the window 4-5): saved after batch 5, at step 3. Resumed, SIGUSR1
    to rank 0 during the validation after step 4 (as SLURM's --signal=USR1@90): saved when validation ends, the job
    requeued once by rank zero. Resumed again to the end: the weights equal the uninterrupted run's, bit for bit."""
    run_dir = tmp_path / "run"
    first = run(["ckpt_path=auto", *signal_at("SIGTERM", batch=4, rank=1)], run_dir)
    assert weights(run_dir)["step"] == 3
    assert f"stopped by SIGTERM at step 3; newest checkpoint: {run_dir}/checkpoints/last.ckpt" in first.stdout

    calls = tmp_path / "scontrol-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    second = run(["ckpt_path=auto", *signal_at("SIGUSR1", batch=6, rank=0, validation=True)], run_dir)
    monkeypatch.undo()
    assert weights(run_dir)["step"] == 4
    assert "stopped by SIGUSR1 at step 4" in second.stdout
    assert calls.read_text() == "requeue 4242\n"  # once: rank zero only
    assert "requeued SLURM job 4242" in second.stdout

    third = run(["ckpt_path=auto"], run_dir)
    assert "done: 6 steps" in third.stdout
    got = weights(run_dir)
    assert got.keys() == uninterrupted.keys() and got["step"] == 6
    differ = [k for k in got if not torch.equal(torch.as_tensor(got[k]), torch.as_tensor(uninterrupted[k]))]
    assert not differ, differ
