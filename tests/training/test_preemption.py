"""llmtrain's preemption handling without processes: who requeues a SLURM job after SIGUSR1, what a failing
scontrol does, and that Lightning's hpc_ckpt_N.ckpt is never resumed from."""

import os
import stat
from types import SimpleNamespace

import pytest

from llmtrain.training import preemption
from llmtrain.training.callbacks import LastCheckpoint


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake scontrol on PATH that writes its arguments to a file (and fails when FAIL is in its environment),
    inside a SLURM job."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ -z "$FAIL" ] || {{ echo "Invalid job id" >&2; exit 1; }}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "FAIL"):
        monkeypatch.delenv(key, raising=False)
    return calls


def signalled(received: str | None, rank: int, tmp_path) -> tuple[LastCheckpoint, SimpleNamespace]:
    """A LastCheckpoint at a window end on `rank` of two, whose handler noted `received` (the other rank the same:
    the decision is any rank's); its saves recorded instead of written."""
    trainer = SimpleNamespace(global_step=3, is_global_zero=rank == 0, state=None, saved=[],
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    trainer._signal_connector = preemption.PreemptionSignals(trainer)
    trainer._signal_connector.received = received
    trainer.save_checkpoint = lambda path, weights_only: trainer.saved.append(path)
    return LastCheckpoint(str(tmp_path / "checkpoints")), trainer


@pytest.mark.parametrize("received, rank, requeued", [("SIGUSR1", 0, True), ("SIGUSR1", 1, False),
                                                      ("SIGTERM", 0, False), (None, 0, False)])
def test_sigusr1_saves_and_rank_zero_alone_requeues_the_slurm_job(scontrol, tmp_path, received, rank, requeued):
    callback, trainer = signalled(received, rank, tmp_path)
    callback._stop_if_signalled(trainer)
    assert trainer.saved == ([] if received is None else [tmp_path / "checkpoints" / "last.ckpt"])
    assert trainer._signal_connector.received_sigterm == (received is not None)  # Lightning stops the run next
    assert (scontrol.read_text() if scontrol.exists() else "") == ("requeue 4242\n" if requeued else "")


def test_an_array_task_is_requeued_by_its_own_id(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert preemption.requeue_slurm_job().startswith("requeued SLURM job 100_7")
    assert scontrol.read_text() == "requeue 100_7\n"


def test_no_requeue_outside_slurm(scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID")
    assert preemption.requeue_slurm_job() is None and not scontrol.exists()


@pytest.mark.parametrize("broken", ["failing", "missing"])
def test_a_failing_or_missing_scontrol_is_one_warning_and_the_checkpoint_is_saved(scontrol, tmp_path, monkeypatch,
                                                                                  capsys, broken):
    if broken == "failing":
        monkeypatch.setenv("FAIL", "1")
    else:
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    callback, trainer = signalled("SIGUSR1", 0, tmp_path)
    callback._stop_if_signalled(trainer)
    assert trainer.saved == [tmp_path / "checkpoints" / "last.ckpt"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not requeue SLURM job 4242 (scontrol requeue 4242: ")
    assert err[0].endswith("resubmit it with the same overrides and ckpt_path=auto")
    assert ("Invalid job id" in err[0]) == (broken == "failing")


def test_a_stale_hpc_checkpoint_is_never_resumed_from_under_slurm(tmp_path, monkeypatch):
    """Lightning resumes from hpc_ckpt_N.ckpt in default_root_dir when fit gets ckpt_path=None under SLURM (without
    llmtrain's resume checks); the Trainer the recipe builds has SLURM's environment without auto-requeue and
    resumes from nothing."""
    from conftest import TINY, compose
    from lightning.pytorch.trainer.states import TrainerFn

    from llmtrain.run.resolve import resolve_run
    from llmtrain.run.train import build_trainer

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"a checkpoint of Lightning's auto-requeue")
    cfg = compose(TINY, tmp_path)
    trainer = build_trainer(cfg, resolve_run(cfg))
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False
    connector = trainer._checkpoint_connector
    assert connector._parse_ckpt_path(TrainerFn.FITTING, None, model_provided=True, model_connected=True) is None
    assert preemption.stale_hpc_warning(tmp_path) == (
        f"warning: {tmp_path} holds hpc_ckpt_3.ckpt from Lightning's SLURM auto-requeue: llmtrain does not resume "
        f"from it (it would skip the resume checks); ckpt_path=auto resumes from checkpoints/last.ckpt")
    assert preemption.stale_hpc_warning(tmp_path / "checkpoints") is None
