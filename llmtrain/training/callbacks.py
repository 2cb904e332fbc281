"""Callbacks of our own (throughput, last.ckpt and the save on preemption) and the atomic checkpoint writer; the
stock ones (best checkpoint by val/loss, LR monitor, progress bar) come from Lightning."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from llmtrain.files import saving
from llmtrain.training.flops import TrainingFlops, attention_width, peak_flops, training_flops
from llmtrain.training.preemption import PreemptionSignals, requeue_slurm_job, take_over_signals


class TokenCounts:
    """Tokens that are not padding, and tokens x their batch's sequence length (what attention costs): plain numbers
    for batches without padding, sums kept on the device for padded ones (read back only when asked)."""

    def __init__(self) -> None:
        self.host = [0, 0]
        self.device: torch.Tensor | None = None

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        ids = batch["input_ids"]  # (B, T)
        if "lengths" in batch:  # right-padded sequences
            tokens = batch["lengths"].sum()
            counts = torch.stack([tokens, tokens * ids.size(1)])
            self.device = counts if self.device is None else self.device + counts
        else:  # windows: every position is a token
            self.host[0] += ids.numel()
            self.host[1] += ids.numel() * ids.size(1)

    def empty(self) -> bool:
        return self.host[0] == 0 and self.device is None

    def total(self, device: torch.device) -> torch.Tensor:
        counts = torch.tensor(self.host, dtype=torch.float64, device=device)
        return counts if self.device is None else counts + self.device.double()


class Throughput(L.Callback):
    """Logs train/tokens_per_sec (all ranks together) and, when the FLOPs and the peak are known, train/mfu.

    Tokens are the ones the model processed that are not padding (the sequences' real lengths; every position of
    a pretraining window). They are counted on the device and read back, summed over ranks, only on logging
    steps (every `log_every_n_steps` optimizer steps): the steps in between wait for nothing. The rate covers the
    steps since the previous log, so the first step (start-up, compilation) drops out of every figure after the
    first. MFU = the FLOPs those tokens cost per second (`flops`: flops.TrainingFlops of the model being trained,
    which decides the backward pass by what trains; computed when fit starts unless given) over the peak of all
    devices: `peak_flops` (perf.peak_flops), or the device's dense peak at the run's precision from flops.PEAK_FLOPS
    (for a device not in it, a line says how to get train/mfu anyway). The means over the run and the peak memory
    of this process are printed at the end.
    """

    def __init__(self, log_every_n_steps: int | None = None, peak_flops: float | None = None, tf32: bool = False,
                 flops: TrainingFlops | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.flops, self.peak_flops, self.tf32 = flops, peak_flops, tf32
        self._t_last = self._t_first_step = None
        self._window, self._since_first = TokenCounts(), TokenCounts()
        self._last_step = self._first_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = pl_module.gpt.config
        if self.flops is None:
            self.flops = training_flops(pl_module.model, config.n_layers, attention_width(config))
        if self.peak_flops is None:
            self.peak_flops = device_peak(trainer.strategy.root_device, trainer.precision, self.tf32)

    def _rate(self, counts: TokenCounts, seconds: float, trainer, device) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) of this rank's counts over seconds: the one host sync, after a sum over ranks."""
        tokens, positions = trainer.strategy.reduce(counts.total(device), reduce_op="sum").tolist()
        seconds = max(seconds, 1e-9)
        if not self.flops or not self.peak_flops:
            return tokens / seconds, None
        flops = self.flops.per_token * tokens + self.flops.per_position * positions
        return tokens / seconds, flops / seconds / (self.peak_flops * trainer.world_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._window.add(batch)
        if self._t_first_step is not None:
            self._since_first.add(batch)
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        now = time.perf_counter()
        if self._t_first_step is None:
            self._t_first_step, self._first_step = now, step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % every == 0:
            rate, mfu = self._rate(self._window, now - self._t_last, trainer, pl_module.device)
            pl_module.log("train/tokens_per_sec", rate, rank_zero_only=True)
            if mfu is not None:
                pl_module.log("train/mfu", mfu, rank_zero_only=True)
            self._t_last, self._window = now, TokenCounts()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_first_step is None or self._since_first.empty():  # the same on every rank
            return
        seconds = time.perf_counter() - self._t_first_step
        rate, mfu = self._rate(self._since_first, seconds, trainer, pl_module.device)
        rank_zero_info(
            f"throughput: {rate:,.0f} tokens/s over {trainer.global_step - self._first_step} steps after the first "
            f"({seconds:.1f} s, including validation)" + (f", MFU {mfu:.1%}" if mfu is not None else "")
            + f", peak memory {peak_memory_gib(pl_module.device):.2f} GiB"
            + (" (GPU, this rank)" if pl_module.device.type == "cuda" else " (RSS, this process)")
        )


def device_peak(device: torch.device, precision: str | int, tf32: bool) -> float | None:
    """The dense peak FLOP/s of this run's device from the table in flops.py; for a device not in it, a line saying
    how to get train/mfu anyway."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "this CPU"
    peak = peak_flops(name, precision, tf32=tf32 and cuda)
    if peak is None:
        rank_zero_info(f"train/mfu is not logged: the peak FLOP/s of {name} at trainer.precision={precision} is not "
                       f"in llmtrain's table; set perf.peak_flops=<its dense peak per device> to log it")
    return peak


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process held: allocated on its GPU, or resident in RAM (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class LastCheckpoint(L.Callback):
    """Keeps `checkpoints/last.ckpt` at a state a run can resume from exactly, and says where it is.

    It saves every `every_n_steps` optimizer steps, at the final step, and when SIGTERM or SIGUSR1 arrives (what
    SLURM and cloud schedulers send before they stop a job), always right after an optimizer step: between the
    micro-batches of a gradient-accumulation window the summed gradients would be lost. The signal handlers only
    note a signal (preemption.py); at the next window end, or at the end of a validation run at one, the ranks
    agree (any rank signalled is enough), all save (rank zero writes), rank zero requeues a SLURM job after
    SIGUSR1, and Lightning stops the run on every rank. Saving inside `fit` at the end of a batch means that
    each checkpoint holds the data position in the same form (see resume.py).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100) -> None:
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._last_step = 0  # global_step after the previous batch: it grows when a batch ends a window
        self._at_window_end = True  # no accumulated gradients outstanding

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        take_over_signals(trainer)  # Lightning registers the signal handlers right after this hook

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = self.saved_step = trainer.global_step  # a resumed run does not re-save its start
        if trainer.ckpt_path:  # ... whose newest state is the checkpoint it resumed from
            self.saved_path = Path(trainer.ckpt_path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        self._at_window_end = stepped
        if not stepped:  # finish the accumulation window first
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self._save(trainer)
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._at_window_end:
            self._stop_if_signalled(trainer)  # a signal during validation: stop when it ends

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:  # stopped early, e.g. by trainer.should_stop
            self._save(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        """At a window end on every rank: if any rank was signalled, save, requeue after SIGUSR1, and stop."""
        signals = trainer._signal_connector
        if not isinstance(signals, PreemptionSignals):
            return
        if not trainer.strategy.reduce_boolean_decision(signals.received is not None, all=False):
            return
        self._save(trainer)
        usr1 = trainer.strategy.reduce_boolean_decision(signals.received == "SIGUSR1", all=False)
        signals.received = "SIGUSR1" if usr1 else "SIGTERM"  # the same name on every rank, for the last line
        rank_zero_info(f"{signals.received}: saved {self.saved_path} at step {trainer.global_step}")
        if usr1 and trainer.is_global_zero and (requeued := requeue_slurm_job()):
            rank_zero_info(requeued)
        signals.received_sigterm = True  # Lightning raises SIGTERMException next, on every rank

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step and self.saved_path is not None:
            return
        self.saved_path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved_path, weights_only=False)  # the full state: an exact resume
        self.saved_step = trainer.global_step


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    """Where the newest state of this run was saved (last.ckpt or a best-by-val/loss file), or None."""
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    if last is not None and last.saved_path is not None:
        return str(last.saved_path)
    return next((cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks
                 if cb.last_model_path or cb.best_model_path), None)


def pid_alive(pid: str) -> bool:
    """Whether the process of this pid (as a temp file's name ends) still runs; a name that is no pid: True."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Reads every checkpoint with weights_only=True; writes each one beside its destination, syncs it to disk, then
    renames it into place.

    A kill or a full disk during a save leaves the previous file whole (a rename within one folder is
    atomic); Lightning's own writer goes through the system temp dir, which on clusters often lies on another
    filesystem, where the final move is a copy that a kill can cut short. Remote paths (s3://, ...) are left
    to Lightning.
    """

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        """Every load Lightning makes (fit's ckpt_path, validate's and test's) unpickles no objects: weights_only=True,
        whatever the caller asked; llmtrain's checkpoints hold tensors, dicts and plain values only. (Under FSDP a
        full checkpoint is read by Lightning's own lazy loader instead; train.py opens it with `safe_load` first.)"""
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(".*.tmp*"):  # left by a save that was killed
            if stale.name.startswith(f".{path.name}.tmp") or not pid_alive(stale.name.rpartition(".tmp")[2]):
                stale.unlink(missing_ok=True)  # another name's too (a best checkpoint's changes with its step)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with saving(path):  # a full disk: one line naming the file, the previous one whole
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
            finally:
                tmp.unlink(missing_ok=True)
