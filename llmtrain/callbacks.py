"""Callbacks of our own; the stock ones (checkpointing, LR monitor, progress bar) come from Lightning."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

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
    import torch

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
    (flops_per_token x tokens/s) over the peak of all devices; train.py fills in flops_per_token from the
    model's shape and peak_flops from `perf.peak_flops` or the table above. The means over the run are
    printed at the end.
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


def last_checkpoint_callback(trainer: L.Trainer):
    """The ModelCheckpoint that keeps last.ckpt (conf/callbacks: last_checkpoint), else the first one, or None."""
    return next((cb for cb in trainer.checkpoint_callbacks if cb.save_last), trainer.checkpoint_callback)


class SaveLast(L.Callback):
    """Keeps `last.ckpt` at the run's final state: when training ends, and on SIGTERM.

    The last_checkpoint callback writes last.ckpt every `checkpoint_every` steps; this adds the step where
    training stops, whatever the interval. SIGTERM is what SLURM and cloud schedulers send before they stop
    a job: Lightning turns it into SIGTERMException at the next batch boundary on every rank, and the state
    is saved there (all ranks take part, rank zero writes), so that `ckpt_path=auto` resumes from it. Both
    saves happen inside `fit`, so they hold the data position like every other checkpoint.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: str | None = None

    def _save(self, trainer: L.Trainer) -> None:
        import os

        last = last_checkpoint_callback(trainer)
        dirpath = (self.dirpath or getattr(last, "dirpath", None)
                   or os.path.join(trainer.default_root_dir, "checkpoints"))
        self.saved_path = os.path.join(dirpath, "last.ckpt")
        trainer.save_checkpoint(self.saved_path)
        if last is not None:  # so that it does not write the same state again at train end
            last._last_global_step_saved, last._last_checkpoint_saved = trainer.global_step, self.saved_path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = last_checkpoint_callback(trainer)
        if last is None or getattr(last, "_last_global_step_saved", None) != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.stage != "train":
            return
        self._save(trainer)
        rank_zero_info(f"SIGTERM: saved {self.saved_path} at step {trainer.global_step}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its destination, syncs it to disk, then renames it into place.

    A kill or a full disk during a save leaves the previous file whole (a rename within one folder is
    atomic); Lightning's own writer goes through the system temp dir, which on clusters often lies on another
    filesystem, where the final move is a copy that a kill can cut short. Remote paths (s3://, ...) are left
    to Lightning.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import os
        from pathlib import Path

        import torch

        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
