"""Classification: the logits at each sequence's last real token, the summed loss, accuracy and macro-F1 from the
split's confusion matrix, the final line."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.classify import Classify


def classifier() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    model.replace_head(3)
    return model.eval()


BATCH = {"input_ids": torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 0]]), "lengths": torch.tensor([3, 5]),
         "label": torch.tensor([2, 0])}


def test_the_logits_are_read_at_each_sequences_last_real_token():
    model = classifier()
    with torch.no_grad():
        expected = model(BATCH["input_ids"])[[0, 1], [2, 4]]
        torch.testing.assert_close(Classify(train_blocks="all", lora=None).logits(model, BATCH), expected)


def test_the_loss_is_summed_over_the_sequences_of_the_batch():
    """The LightningModule divides by the count of the whole step: the stage hands over a sum."""
    model = classifier()
    with torch.no_grad():
        total, count, logs = Classify(train_blocks="all", lora=None).loss(model, BATCH)
        per_sequence = F.cross_entropy(model(BATCH["input_ids"])[[0, 1], [2, 4]], BATCH["label"], reduction="none")
    assert count == 2 and logs == {}
    assert total.item() == pytest.approx(per_sequence.sum().item(), rel=1e-6)


def test_accuracy_over_every_sequence_and_f1_averaged_over_the_classes():
    """8 of class 0 all right, 2 of class 1 one right: accuracy 9 / 10 (not the mean of the recalls, 0.75), F1 of
    class 0 2 * 8 / (9 + 8), of class 1 2 * 1 / (1 + 2), macro-F1 their mean."""
    d = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    metrics = Classify(train_blocks="all", lora=None).eval_metrics(
        {"loss": d(5.0), "count": d(10.0), "confusion": d([[8.0, 0.0], [1.0, 1.0]])})  # rows: truth
    assert metrics["loss"].item() == pytest.approx(0.5)
    assert metrics["acc"].item() == pytest.approx(0.9)
    assert metrics["f1"].item() == pytest.approx((16 / 17 + 2 / 3) / 2)


def test_the_final_line_compares_test_accuracy_with_the_test_majority_class():
    data = SimpleNamespace(majority_baseline=lambda split: {"val": 0.5, "test": 0.625}[split])
    metrics = {"val/loss": 0.25, "val/acc": 0.875, "test/acc": 0.75, "test/f1": 0.5}
    assert Classify(train_blocks="all", lora=None).summary(metrics, data) == (
        "val/loss 0.2500, val/acc 0.8750, test/acc 0.7500 (majority class 0.6250), test/f1 0.5000")
