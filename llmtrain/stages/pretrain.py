"""Pretraining: next-token prediction on a stream of text windows, from random weights or from init_from.

Every position of a window carries loss, so each rank's micro-batches sum over the same number of tokens. The head
and the loss may run a chunk of tokens at a time (`loss_chunk`), so that the (tokens x vocabulary) logits never
exist at once.
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.model.losses import chunked_lm_loss_sum, lm_loss_sum
from llmtrain.stages.base import Stage, inner_gpt


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the labelled tokens, their number). With `chunk`, the head is applied to the final
    hidden states a chunk of tokens at a time inside the loss (a head that LoRA adapted takes the plain path)."""
    gpt = inner_gpt(model)
    packed = {"segments": batch["segments"]} if "segments" in batch else {}  # packed records (data/packing.py)
    if chunk and type(gpt.head) is nn.Linear and gpt.head.bias is None:
        hidden = gpt.hidden(batch["input_ids"], **packed)  # (B, T, C)
        return chunked_lm_loss_sum(hidden, gpt.head.weight, batch["labels"], chunk)
    return lm_loss_sum(model(batch["input_ids"], **packed), batch["labels"])


class Pretrain(Stage):
    """Next-token prediction over every token of each window; val/loss and val/ppl."""

    name = "pretrain"
    data_module = "TextDataModule"
    data_presets = "data=embedded or data=text"
    metrics = ("loss", "ppl")
    counts_vary = False  # full windows: every micro-batch of every rank sums over batch_size x context tokens

    def __init__(self, train_blocks: str | int, lora: dict | None, loss_chunk: int | None, sample_prompt: str | None,
                 sample_tokens: int) -> None:
        super().__init__(train_blocks, lora, loss_chunk, sample_tokens)
        self.sample_prompts = [sample_prompt] if sample_prompt else []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        total, tokens = lm_loss(model, batch, self.loss_chunk)
        return total, tokens, {}

    def eval_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = (totals["loss"] / totals["count"].clamp(min=1)).float()
        return {"loss": loss, "ppl": torch.exp(loss)}

    def summary(self, metrics: dict[str, float], datamodule) -> str:
        return f"val/loss {metrics['val/loss']:.4f}, val/ppl {metrics['val/ppl']:.2f}"
