"""Callbacks of our own; the stock ones (checkpointing, LR monitor, progress bar) come from Lightning."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class Throughput(L.Callback):
    """Logs train/tokens_per_sec (all ranks together) every `log_every_n_steps` optimizer steps.

    The rate covers the steps since the previous log, so the first optimizer step (start-up, compilation)
    is left out of every figure after the first window. The mean over the run is printed at the end.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._t_last = self._t_first_step = None
        self._tokens_window = self._tokens_since_first = 0
        self._last_step = 0

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
            self._t_last, self._tokens_window = now, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_first_step is None or not self._tokens_since_first:
            return
        seconds = time.perf_counter() - self._t_first_step
        rank_zero_info(
            f"throughput: {self._tokens_since_first / seconds:,.0f} tokens/s over {trainer.global_step - 1} steps "
            f"after the first ({self._tokens_since_first:,} tokens in {seconds:.1f} s, including validation)"
        )
