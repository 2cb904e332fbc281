"""Callbacks of our own (throughput, last.ckpt) and the atomic checkpoint writer; the stock ones (best
checkpoint by val/loss, LR monitor, progress bar) come from Lightning."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Dense peak FLOP/s per device from vendors' datasheets (no sparsity): bf16 and tf32 tensor-core rates.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "tf32": 494e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12},
    "H100": {"bf16": 989e12, "tf32": 494e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},
    "A10": {"bf16": 125e12, "tf32": 62.5e12},
    "L4": {"bf16": 121e12, "tf32": 60e12},
    "RTX 4090": {"bf16": 165e12, "tf32": 82.6e12},
}


def device_peak_flops(precision: str) -> float | None:
    """The peak of the current CUDA device for this precision, from PEAK_FLOPS; None when unknown (e.g. CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    kind = "bf16" if "bf16" in str(precision) or "16" in str(precision) else "tf32"
    for key, peaks in PEAK_FLOPS.items():  # the more specific names come first
        if key in name:
            return peaks[kind]
    return None


class Throughput(L.Callback):
    """Logs train/tokens_per_sec (all ranks together) and, when the FLOPs are known, train/mfu.

    The rate covers the optimizer steps since the previous log (every `log_every_n_steps`), so the first
    step (start-up, compilation) drops out of every figure after the first. MFU = achieved model FLOP/s
    (flops_per_token x tokens/s) over the peak of all devices; the recipe (train.py) fills in flops_per_token
    from the model's shape and peak_flops from `perf.peak_flops` or the table above. The means over the run
    are printed at the end.
    """

    def __init__(self, log_every_n_steps: int | None = None, flops_per_token: float | None = None,
                 peak_flops: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._t_last = self._t_first_step = None
        self._tokens_window = self._tokens_since_first = 0
        self._last_step = 0

    def _mfu(self, tokens_per_sec: float, world_size: int) -> float | None:
        if not self.flops_per_token or not self.peak_flops:
            return None
        return tokens_per_sec * self.flops_per_token / (self.peak_flops * world_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch["input_ids"].numel() * trainer.world_size
        self._tokens_window += tokens
        if self._t_first_step is not None:
            self._tokens_since_first += tokens
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        now = time.perf_counter()
        if self._t_first_step is None:
            self._t_first_step = now
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % every == 0:
            rate = self._tokens_window / max(now - self._t_last, 1e-9)
            pl_module.log("train/tokens_per_sec", rate, rank_zero_only=True)
            mfu = self._mfu(rate, trainer.world_size)
            if mfu is not None:
                pl_module.log("train/mfu", mfu, rank_zero_only=True)
            self._t_last, self._tokens_window = now, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_first_step is None or not self._tokens_since_first:
            return
        seconds = time.perf_counter() - self._t_first_step
        rate = self._tokens_since_first / seconds
        mfu = self._mfu(rate, trainer.world_size)
        rank_zero_info(
            f"throughput: {rate:,.0f} tokens/s over {trainer.global_step - 1} steps after the first "
            f"({self._tokens_since_first:,} tokens in {seconds:.1f} s, including validation)"
            + (f", MFU {mfu:.1%}" if mfu is not None else "")
        )


class LastCheckpoint(L.Callback):
    """Keeps `checkpoints/last.ckpt` at a state a run can resume from exactly, and says where it is.

    It saves every `every_n_steps` optimizer steps, at the final step, and when SIGTERM arrives (what SLURM
    and cloud schedulers send before they stop a job), always right after an optimizer step: between the
    micro-batches of a gradient-accumulation window the summed gradients would be lost. A SIGTERM in the middle
    of a window is held back until the window ends; then the state is saved on every rank (rank zero writes)
    and Lightning stops the run. Saving inside `fit` at the end of a batch means that each checkpoint holds
    the data position in the same form (see resume.py).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100) -> None:
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._last_step = 0  # global_step after the previous batch: it grows when a batch ends a window
        self._at_window_end = True  # no accumulated gradients outstanding
        self._sigterm = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = self.saved_step = trainer.global_step  # a resumed run does not re-save its start
        if trainer.ckpt_path:  # ... whose newest state is the checkpoint it resumed from
            self.saved_path = Path(trainer.ckpt_path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        self._at_window_end = stepped
        if trainer.received_sigterm and not stepped:  # finish the accumulation window first
            self._sigterm = True
            _set_received_sigterm(trainer, False)
        if not stepped:
            return
        stop = trainer.strategy.reduce_boolean_decision(self._sigterm or trainer.received_sigterm, all=False)
        step = trainer.global_step
        if stop or step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self._save(trainer)
        if stop:
            rank_zero_info(f"SIGTERM: saved {self.saved_path} at step {step}")
            _set_received_sigterm(trainer, True)  # Lightning raises SIGTERMException at the end of this batch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:  # stopped early, e.g. by trainer.should_stop
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM that Lightning raised elsewhere (during a validation inside fit): save if at a window end."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._at_window_end and self.saved_step != trainer.global_step:
            self._save(trainer)
            rank_zero_info(f"SIGTERM: saved {self.saved_path} at step {trainer.global_step}")

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step and self.saved_path is not None:
            return
        self.saved_path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved_path, weights_only=False)  # the full state: optimizer, loops, callbacks
        self.saved_step = trainer.global_step


def _set_received_sigterm(trainer: L.Trainer, value: bool) -> None:
    # Trainer.received_sigterm is a read-only view of the flag that Lightning's SIGTERM handler sets and its
    # loops check at every batch end; holding a signal back until a window ends means setting the flag itself
    trainer._signal_connector.received_sigterm = value


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    """Where the newest state of this run was saved (last.ckpt or a best-by-val/loss file), or None."""
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    if last is not None and last.saved_path is not None:
        return str(last.saved_path)
    return next((cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks
                 if cb.last_model_path or cb.best_model_path), None)


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
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
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
