"""Decoding: int8 weight-only layers close to fp32, which precision `auto` picks, a model prepared for each."""

import copy

import pytest
import torch
from torch import nn

import llmtrain.run.decoding as decoding
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.decoding import Int8Linear, decode_precision, prepare_for_decoding, quantize_int8


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True) | kw
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_within_a_percent_of_the_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (300, 64) and q.scales.shape == (300,)
    x = torch.randn(3, 5, 64)
    exact = linear(x)
    assert q(x).shape == exact.shape and q(x).dtype == torch.float32
    assert (q(x) - exact).abs().max() < 0.01 * exact.abs().max()
    rows = q.weight.float() * q.scales.float()[:, None]  # dequantized: off by half a step + the bf16 scale's rounding
    assert ((rows - linear.weight).abs() <= q.scales.float()[:, None] * 1.01).all()


def test_a_quantized_gpt_keeps_its_embedding_and_stays_close():
    model = tiny(tie_weights=True)
    x = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(x)
        quantized = quantize_int8(copy.deepcopy(model))
        approx = quantized(x)
    linears = [m for m in quantized.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert linears and all(type(m) is Int8Linear for m in linears)  # every linear, the head included
    assert quantized.tok_emb.weight.dtype == torch.float32  # the tied embedding keeps fp32
    assert (approx - exact).abs().max() < 0.1 * exact.std()
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    out = quantized.generate(x[:1, :5], 10, temperature=0)  # the KV cache works on the quantized model
    assert out.shape == (1, 15)


def test_auto_precision(monkeypatch):
    monkeypatch.setattr(decoding, "int8_available", lambda: True)
    assert decode_precision("auto", torch.device("cpu")) == "int8"
    assert decode_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(decoding, "int8_available", lambda: False)
    assert decode_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(decoding, "cuda_bf16", lambda: True)
    assert decode_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(decoding, "cuda_bf16", lambda: False)
    assert decode_precision("auto", torch.device("cuda")) == "fp32"


def test_prepare_for_decoding_in_each_precision():
    cpu = torch.device("cpu")
    assert prepare_for_decoding(tiny(), "fp32", cpu).head.weight.dtype == torch.float32
    assert prepare_for_decoding(tiny(), "bf16", cpu).head.weight.dtype == torch.bfloat16
    assert type(prepare_for_decoding(tiny(), "int8", cpu).head) is Int8Linear
    bf16 = prepare_for_decoding(tiny(), "bf16", cpu)
    assert bf16.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0).shape == (1, 7)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, device):
    from llmtrain.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=rf"^device={device}: .* available here: use device=cpu \(or device=auto\)$"):
        decoding.resolve_device(device)
    assert decoding.resolve_device("auto") == torch.device("cpu") == decoding.resolve_device("cpu")


@pytest.mark.parametrize("options", [
    dict(head_dim=24, qk_norm=True, n_heads=4, n_kv_heads=2),  # Qwen3: out_proj reads 4 x 24 = 96, not 32
    dict(qkv_bias=True, bias=False, n_heads=4, n_kv_heads=1,
         rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),  # Qwen2's biases, Llama 3's RoPE
], ids=["qwen3", "qwen2-llama3-rope"])
def test_int8_decoding_of_the_llama_shaped_options(options):
    """Every linear int8, whatever its width; QK-norm's gains stay fp32; cached decoding works; logits stay close."""
    model = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=64, **options)
    x = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(x)
        quantized = prepare_for_decoding(copy.deepcopy(model), "int8", torch.device("cpu"))
        approx = quantized(x)
    attn = quantized.blocks[0].attn
    assert type(attn.qkv) is Int8Linear and type(attn.out_proj) is Int8Linear
    assert attn.out_proj.in_features == model.config.n_heads * model.config.head_dim
    if model.config.qk_norm:
        assert attn.q_norm.weight.dtype == torch.float32
    assert (approx - exact).abs().max() < 0.1 * exact.std()
    assert quantized.generate(x[:1, :5], 10, temperature=0).shape == (1, 15)


def test_the_note_names_the_format_and_how_to_get_exact_tokens():
    cpu = torch.device("cpu")
    assert decoding.precision_note("fp32", "fp32", cpu) == (
        "decoding in fp32 (precision=fp32): the exact tokens of the trained weights")
    note = decoding.precision_note("auto", "int8", cpu)
    assert note.startswith("decoding with int8 weight-only weights (precision=auto on this CPU")
    assert note.endswith("precision=fp32 gives its exact tokens")
    assert "bf16 weights" in decoding.precision_note("bf16", "bf16", cpu)
