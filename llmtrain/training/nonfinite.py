"""The NaN/Inf guard: a non-finite training loss or gradient stops the run at the step where it happened, or is
skipped (up to `max_nonfinite_steps`), without a device-to-host copy or a collective on the steps in between.

Each micro-batch adds its loss to a sum kept on the device. At the optimizer step the LightningModule hands over
the gradient norm (which it computes anyway), and the step is bad when the loss sum or the norm is not finite.
The norm is taken after DDP's all-reduce, so every rank sees a NaN that arose on any of them.

- `max_nonfinite_steps=0` (the default): the first bad step is remembered on the device, and looked at only
  where the run synchronises anyway: on logging steps, before a checkpoint is saved, before a validation, at
  the end of training. The run then stops with the step where it happened, and the last checkpoint saved before
  it (none is saved after it). The weights of the steps in between are lost with the run.
- `max_nonfinite_steps=K > 0`: a bad step must be skipped before the optimizer applies it, so every optimizer
  step is looked at (one host sync and, with several ranks, one all-gather of three numbers per step). A skipped
  step leaves the weights and the optimizer state as they were (its gradients are dropped).

Under 16-mixed (fp16 with a GradScaler) an infinite gradient is the scaler's business (it skips the step and
lowers the scale): only the loss is checked.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from llmtrain.errors import UserError
from llmtrain.training.callbacks import newest_checkpoint


class NonFiniteGuard:
    def __init__(self, max_skipped: int) -> None:
        self.max_skipped, self.skipped = max_skipped, 0
        self._loss = self._count = None  # this step's summed micro-batch losses, and how many (on the device)
        self._first = None  # (step, loss, grad norm) of the first bad step not yet looked at, on the device

    def add(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss (every micro-batch; no sync)."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        self._count = 1 if self._count is None else self._count + 1

    def skip_step(self, module: L.LightningModule, grad_norm: torch.Tensor, sync: bool) -> bool:
        """At the optimizer step, before the update: whether to skip it (its gradients are to be dropped). Raises a
        UserError when the run must stop. `sync`: a step on which the run synchronises anyway (a logging step)."""
        loss = self._loss / self._count if self._loss is not None else torch.zeros((), device=grad_norm.device)
        self._loss = self._count = None
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        norm = grad_norm.float() if scaler is None else torch.zeros_like(loss)
        bad = ~torch.isfinite(loss) | ~torch.isfinite(norm)
        step = module.trainer.global_step
        if self._first is None:
            self._first = (torch.full_like(loss, -1), torch.zeros_like(loss), torch.zeros_like(loss))
        first_step, first_loss, first_norm = self._first
        new = bad & (first_step < 0)
        self._first = (torch.where(new, step, first_step), torch.where(new, loss, first_loss),
                       torch.where(new, norm, first_norm))
        if self.max_skipped == 0:
            if sync:
                self.check(module)
            return False
        found = self._reduce(module)
        if found is None:
            return False
        self._first = None
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise UserError(self._message(module, *found))
        rank_zero_warn(f"skipped an optimizer step: the {self._what(*found)} "
                       f"({self.skipped} of max_nonfinite_steps={self.max_skipped})")
        module.log("train/skipped_nonfinite", float(self.skipped))
        return True

    def check(self, module: L.LightningModule) -> None:
        """Stop if a step since the last check was bad (a host sync, and an all-gather with several ranks): call it
        where the run synchronises anyway, on every rank."""
        found = self._reduce(module)
        if found is not None:
            raise UserError(self._message(module, *found))
        self._first = None

    def _reduce(self, module: L.LightningModule) -> tuple[int, float, float] | None:
        """(step, loss, grad norm) of the first bad step on any rank (one all-gather of three numbers), or None."""
        if self._first is None:
            return None
        first = torch.stack(self._first)
        if module.trainer.world_size > 1:
            first = module.trainer.strategy.all_gather(first)  # (ranks, 3)
        bad = [row for row in first.reshape(-1, 3).tolist() if row[0] >= 0]
        if not bad:
            return None
        step, loss, norm = min(bad, key=lambda row: (row[0], math.isfinite(row[1])))  # the rank whose loss was bad
        return int(step), loss, norm

    @staticmethod
    def _what(step: int, loss: float, norm: float) -> str:
        if not math.isfinite(loss):
            return f"training loss is {loss} at step {step}"
        return f"gradient norm is {norm} at step {step} (training loss {loss:.4g})"

    def _message(self, module: L.LightningModule, step: int, loss: float, norm: float) -> str:
        ckpt = newest_checkpoint(module.trainer) or "none yet"
        return (f"the {self._what(step, loss, norm)}; last good checkpoint: {ckpt}. Lower optimizer.lr or "
                f"trainer.gradient_clip_val, or skip such steps with max_nonfinite_steps=K (skipped so far: "
                f"{self.skipped - (self.skipped > self.max_skipped)})")
