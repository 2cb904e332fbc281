"""The losses of the stages, outside the model: next-token cross-entropy summed over the tokens that carry
loss, and a classifier's logits read at the last real token of each sequence. Torch only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that carries no loss: masked prompts, padding (F.cross_entropy's default)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) -> (summed cross-entropy over labelled tokens, their count), in fp32."""
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """logits (B, T, C) of right-padded sequences -> (B, C) at each one's last real token, which has seen the
    whole text and no padding."""
    return logits[torch.arange(logits.size(0), device=logits.device), lengths - 1].float()
