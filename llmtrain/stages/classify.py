"""Classification: the LM head becomes a linear layer to the classes, read at the last real (non-pad) token of each
sequence, which has seen the whole text. Cross-entropy per sequence; accuracy and macro-F1 from a confusion matrix
summed over the whole split (all ranks); the test split is evaluated at the end against the majority class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.model.losses import last_token_logits
from llmtrain.stages.base import Stage

CLASSES_BEFORE_DATA = 2  # rows that stand in for the classes before the data is read (the memory pre-flight)


class Classify(Stage):
    """A new head to the data's classes; by default the last block, the final norm and the head train."""

    name = "classify"
    data_module = "ClassifyDataModule"
    data_presets = "data=classify_embedded or data=sms_spam"
    metrics = ("loss", "acc", "f1")
    progress_metric = "acc"
    predicts_tokens = False  # a head over the classes
    counts_vary = False  # sequences: the loaders give every rank equal shares, batch by batch

    def __init__(self, train_blocks: str | int, lora: dict | None) -> None:
        super().__init__(train_blocks, lora)
        self.label_names: list[str] | None = None

    def setup(self, datamodule) -> None:
        self.label_names = list(datamodule.label_names)

    def new_head(self) -> int:
        return len(self.label_names) if self.label_names else CLASSES_BEFORE_DATA

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, classes) at each sequence's last real token."""
        return last_token_logits(model(batch["input_ids"]), batch["lengths"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["label"]
        total = F.cross_entropy(self.logits(model, batch), labels, reduction="sum")
        return total, torch.tensor(labels.numel(), device=labels.device), {}

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, labels = self.logits(model, batch), batch["label"]
        n = logits.size(1)
        confusion = torch.bincount(labels * n + logits.argmax(dim=-1), minlength=n * n).view(n, n)
        return {"loss": F.cross_entropy(logits, labels, reduction="sum").double(),
                "count": torch.tensor(labels.numel(), device=labels.device, dtype=torch.float64),
                "confusion": confusion.double()}  # rows: truth, columns: prediction

    def eval_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        conf = totals["confusion"]
        tp = conf.diag()
        f1 = 2 * tp / (conf.sum(0) + conf.sum(1)).clamp(min=1)
        return {"loss": (totals["loss"] / totals["count"].clamp(min=1)).float(),
                "acc": (tp.sum() / conf.sum().clamp(min=1)).float(), "f1": f1.mean().float()}

    def record(self) -> dict:
        return super().record() | {"num_classes": self.new_head(), "label_names": self.label_names}

    def test_after_fit(self) -> bool:
        return True

    def summary(self, metrics: dict[str, float], datamodule) -> str:
        return (f"val/loss {metrics['val/loss']:.4f}, val/acc {metrics['val/acc']:.4f}, test/acc "
                f"{metrics['test/acc']:.4f} (majority class {datamodule.majority_baseline('test'):.4f}), test/f1 "
                f"{metrics['test/f1']:.4f}")
