"""Preemption: SIGTERM and SIGUSR1 (what SLURM sends before a job's time limit with `--signal=USR1@90`, and
before it preempts or cancels a job) are only noted when they arrive; the ranks agree at the end of an accumulation
window to save last.ckpt and stop (callbacks.LastCheckpoint), and after SIGUSR1 rank zero asks SLURM to requeue the
job, which resumes through ckpt_path=auto and llmtrain's resume checks.

This replaces Lightning's own handling: its SIGTERM handler runs a collective inside the signal handler and its
loops stop each rank where the signal found it (inside a window, in the middle of validation); its SLURM
auto-requeue saves `hpc_ckpt_N.ckpt`, which a restart under SLURM resumes from without llmtrain's checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals(_SignalConnector):
    """Lightning's signal connector with one handler for SIGTERM and SIGUSR1 that notes the signal and nothing else
    (no collective, no save): `received` is its name. Outside fit (a final validation or test) a signal stops the
    run as Lightning's would."""

    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__(trainer)
        self.received: str | None = None

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()
        for signum in SIGNALS:
            self._register_signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        if self.trainer.state.fn != TrainerFn.FITTING:
            self.received_sigterm = True


class NoHpcResume(_CheckpointConnector):
    """Lightning's checkpoint connector without its lookup of `hpc_ckpt_N.ckpt` in default_root_dir, which it
    resumes from when fit gets ckpt_path=None under SLURM: a run resumes only from what llmtrain resolved and
    checked (ckpt_path=auto finds last.ckpt)."""

    @property
    def _hpc_resume_path(self) -> None:
        return None


def take_over_signals(trainer: L.Trainer) -> None:
    """llmtrain's signal handlers for a Trainer's fit (before Lightning registers its own, in fit)."""
    trainer._signal_connector = PreemptionSignals(trainer)


def ignore_hpc_checkpoints(trainer: L.Trainer) -> L.Trainer:
    """No resume from hpc_ckpt_N.ckpt (before fit: Lightning looks for them before any callback runs)."""
    trainer._checkpoint_connector.__class__ = NoHpcResume
    return trainer


def cluster_plugins() -> list:
    """SLURM's environment with Lightning's auto-requeue off, where Lightning would pick SLURM's environment itself
    (it turns auto-requeue on by default)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_job_id(env: os._Environ | dict = os.environ) -> str | None:
    """The id `scontrol requeue` takes: an array task's own id, or the job's; None outside SLURM."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> str | None:
    """`scontrol requeue <job>` under SLURM (call it on global rank zero only): the line to print, or None outside
    SLURM. A missing or failing scontrol is a warning line; the checkpoint is saved before this runs."""
    job = slurm_job_id()
    if job is None:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        why = None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why is not None:
        print(f"warning: could not requeue SLURM job {job} (scontrol requeue {job}: {why}); resubmit it with the same "
              f"overrides and ckpt_path=auto", file=sys.stderr, flush=True)
        return None
    return f"requeued SLURM job {job}: it resumes from last.ckpt with ckpt_path=auto"


def stopping_signal(trainer: L.Trainer) -> str:
    """The signal that stopped fit, for the run's last line."""
    return getattr(trainer._signal_connector, "received", None) or "SIGTERM"


def stale_hpc_warning(run_dir: Path) -> str | None:
    """The line to print when the run dir holds hpc_ckpt_N.ckpt (written by Lightning's auto-requeue, e.g. by an
    earlier version): they are not resumed from."""
    found = sorted(p.name for p in Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    if not found:
        return None
    return (f"warning: {run_dir} holds {', '.join(found)} from Lightning's SLURM auto-requeue: llmtrain does not "
            f"resume from it (it would skip the resume checks); ckpt_path=auto resumes from checkpoints/last.ckpt")
