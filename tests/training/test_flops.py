"""FLOPs per token from what trains, and device peaks found by their exact names."""

import logging

import pytest
import torch

from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.base import set_trainable
from llmtrain.training.flops import attention_width, peak_flops, training_flops

L_, D, V, T = 3, 32, 100, 16


def gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, context_length=T, emb_dim=D, n_heads=2, n_layers=L_, tie_weights=tie))


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_everything_training_is_six_per_weight_plus_attention():
    for tie in (True, False):
        model = gpt(tie)
        weights = numel(model) - numel(model.pos_emb) - (0 if tie else numel(model.tok_emb))  # lookups: no FLOPs
        assert training_flops(model, L_, D).of_batch(1, T) == 6 * weights + 12 * L_ * D * T
        assert training_flops(model, L_, D).of_batch(5, T) == 5 * (6 * weights + 12 * L_ * D * T)  # both terms


def test_heads_of_their_own_width_set_the_attention_term():
    """Qwen3's shape: 4 heads of 12 (not 32 / 4 = 8) sharing 2 key/value heads, QK-norm: the weights counted as they
    are (q, k, v and o of 4 x 12 and 2 x 12, the norm gains), attention 12 x layers x (4 x 12) x T."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, context_length=T, emb_dim=D, n_heads=4, n_kv_heads=2, head_dim=12, n_layers=L_,
                       pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", mlp_hidden=64, bias=False,
                       tie_weights=True)
    model = GPT(config)
    per_layer = D * (48 + 2 * 24) + 48 * D + 3 * D * 64 + 2 * D + 2 * 12  # qkv, o, the MLP, two norms, QK-norm
    assert numel(model) == L_ * per_layer + D + V * D and attention_width(config) == 48
    assert training_flops(model, L_, attention_width(config)).of_batch(1, T) == 6 * numel(model) + 12 * L_ * 48 * T


def test_frozen_layers_below_the_lowest_trainable_one_do_no_backward():
    """The classify stage's default: only the last block, the final LayerNorm and the new head train."""
    model = gpt(tie=False)
    model.replace_head(2)
    set_trainable(model, "last")
    head_and_top = numel(model.blocks[-1]) + numel(model.ln_f) + numel(model.head)
    lower = numel(model.blocks[0]) + numel(model.blocks[1])  # forward only (the embeddings are lookups)
    flops = training_flops(model, L_, D)
    assert flops.per_token == 6 * head_and_top + 2 * lower
    assert flops.per_position == 12 * D + 2 * 4 * D  # backward through the last block's attention only


def test_frozen_weights_that_a_gradient_passes_through_cost_two():
    """LoRA on every block's attention: the frozen base weights above the first adapter pass gradients back (2 per
    weight), the adapters train (6), the tied LM head is frozen but used last (2 + 2)."""
    model = gpt(tie=True)
    set_trainable(model, "none")
    model = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["attn.qkv"])
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    first = model.base_model.model.blocks[0]
    below = first.ln1.weight.numel() + first.ln1.bias.numel() + first.attn.qkv.base_layer.weight.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) - V * D - T * D  # the lookups' share
    frozen += V * D  # the tied embedding does the head's matmul
    flops = training_flops(model, L_, D)
    assert flops.per_token == 6 * adapters + 4 * frozen - 2 * below
    assert flops.per_position == L_ * 12 * D


@pytest.mark.parametrize("name, precision, tf32, expected", [
    ("NVIDIA L40S", "bf16-mixed", True, 362.05e12),
    ("NVIDIA L4", "bf16-mixed", True, 121e12),  # not the L40S's (a substring match once gave an L40S the L4's peak)
    ("NVIDIA L40S", "32-true", True, 183e12),
    ("NVIDIA L40S", "32-true", False, 91.6e12),
    ("NVIDIA H100 80GB HBM3", "16-mixed", True, 989.4e12),
    ("NVIDIA H100 PCIe", "bf16-true", True, 756.5e12),
    ("Tesla V100-SXM2-16GB", "16-mixed", True, 125e12),
    ("Tesla V100-SXM2-16GB", "32-true", True, 15.7e12),  # no tensor-core fp32: the plain fp32 rate
    ("Tesla V100-SXM2-16GB", "bf16-mixed", True, None),  # no bf16
    ("NVIDIA L40S-ish prototype", "bf16-mixed", True, None),  # unknown: no guess from a similar name
    ("NVIDIA B200", "bf16-mixed", True, None),
    ("NVIDIA H100 80GB HBM3", "64-true", True, None),
])
def test_the_peak_table_matches_exact_device_names(name, precision, tf32, expected):
    assert peak_flops(name, precision, tf32) == expected


def test_an_unknown_device_gives_no_mfu_and_one_line_saying_how(monkeypatch, caplog):
    from llmtrain.training.callbacks import device_peak

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, expected in (("NVIDIA L40S", 362.05e12), ("NVIDIA RTX PRO 6000 Blackwell", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert device_peak(torch.device("cuda"), "bf16-mixed", tf32=True) == expected
        hints = [r.getMessage() for r in caplog.records if "perf.peak_flops" in r.getMessage()]
        assert hints == ([] if expected else [
            "train/mfu is not logged: the peak FLOP/s of NVIDIA RTX PRO 6000 Blackwell at trainer.precision=bf16-mixed "
            "is not in llmtrain's table; set perf.peak_flops=<its dense peak per device> to log it"])
