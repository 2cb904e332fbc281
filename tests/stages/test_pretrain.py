"""Pretraining: the language-modelling loss through the plain or the chunked head, val/ppl, the final line."""

import math

import pytest
import torch
from conftest import lm_stage

from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.pretrain import lm_loss


def test_a_lora_adapted_head_takes_the_plain_path_whatever_the_chunk():
    """The chunked loss reads the head's weight matrix; with an adapter on the head that is the base weight alone,
    so a chunked loss of the adapted model would be the loss of its base."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    model = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["head"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # an adapter that changes the logits
    batch = {"input_ids": torch.randint(0, 61, (2, 16)), "labels": torch.randint(0, 61, (2, 16))}
    plain, tokens = lm_loss(model, batch, None)
    chunked, chunked_tokens = lm_loss(model, batch, 7)
    with model.disable_adapter():
        base, _ = lm_loss(model, batch, None)
    assert tokens == chunked_tokens == 32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert abs(plain.item() - base.item()) > 1.0  # the adapter matters


def test_perplexity_is_e_to_the_mean_loss_in_nats():
    d = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    metrics = lm_stage().eval_metrics({"loss": d(6.0), "count": d(3.0)})
    assert metrics["loss"].item() == pytest.approx(2.0) and metrics["ppl"].item() == pytest.approx(math.exp(2.0))


def test_a_sample_prompt_is_only_there_when_given():
    assert lm_stage().sample_prompts == []
    assert lm_stage(sample_prompt="Once upon", sample_tokens=8).sample_prompts == ["Once upon"]


def test_the_final_line_shows_loss_and_perplexity():
    assert lm_stage().summary({"val/loss": 2.0, "val/ppl": 7.389}, None) == "val/loss 2.0000, val/ppl 7.39"
