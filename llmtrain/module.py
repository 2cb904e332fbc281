"""The LightningModule: loss, metrics, optimizer and schedule around a plain nn.Module.

It never reads the Hydra config: train.py hands it the model, an optimizer factory (a partial of the
optimizer class) and the schedule's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.model import GPT

IGNORE_INDEX = -100


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_ratio of the peak at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only, not on biases or LayerNorm gains."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class LanguageModel(L.LightningModule):
    """Next-token prediction: cross-entropy over every position whose label is not IGNORE_INDEX."""

    def __init__(
        self,
        model: GPT,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int,
        max_steps: int,
        min_lr: float,
        tokenizer: str = "gpt2",
        sample_prompt: str | None = None,
        sample_tokens: int = 48,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.warmup_steps, self.max_steps, self.min_lr = warmup_steps, max_steps, min_lr
        self.tokenizer_name = tokenizer
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, number of tokens that carry loss)."""
        logits = self.model(batch["input_ids"])  # (B, T, V)
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return loss_sum, (labels != IGNORE_INDEX).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n = self._loss(batch)
        loss = loss_sum / n.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:  # before clipping
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                self.log("train/grad_norm", norm)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n = self._loss(batch)
        self._val_sum += loss_sum.double()
        self._val_count += n.double()

    def on_validation_epoch_end(self) -> None:
        # exact token-weighted mean over the whole validation set, across all ranks
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        val_loss = (total / count.clamp(min=1)).float()
        self.log("val/loss", val_loss, prog_bar=True)
        self.log("val/ppl", torch.exp(val_loss))
        if not self.trainer.sanity_checking:
            self._log_sample()

    def _log_sample(self) -> None:
        """Write a short continuation of sample_prompt to TensorBoard's text tab (rank zero only)."""
        if not self.sample_prompt or self.global_rank != 0 or self.logger is None:
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        from llmtrain.tokenizer import build_tokenizer

        tok = build_tokenizer(self.tokenizer_name)
        prompt = torch.tensor([tok.encode_ordinary(self.sample_prompt)], device=self.device)
        n_new = max(0, min(self.sample_tokens, self.model.config.context_length - prompt.size(1)))
        generator = torch.Generator(device=self.device).manual_seed(0)
        out = self.model.generate(prompt, n_new, temperature=0.8, top_k=50, eos_id=tok.eot_token, generator=generator)
        text = tok.decode([t for t in out[0].tolist() if t < tok.n_vocab])
        experiment.add_text("samples", text, self.global_step)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model))
        peak = optimizer.defaults["lr"]
        min_ratio = self.min_lr / peak if peak else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, self.max_steps, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints describe themselves: the model config and tokenizer travel with the weights
        checkpoint["llmtrain"] = {"model_config": asdict(self.model.config), "tokenizer": self.tokenizer_name,
                                  "task": "lm"}
