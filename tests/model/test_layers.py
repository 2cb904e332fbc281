"""The layers of the Llama options, each against a direct computation: RMSNorm, RoPE, grouped-query attention,
the SwiGLU MLP."""

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model.layers import MLP, CausalSelfAttention, RMSNorm, apply_rope, make_norm, rope_angles


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_rmsnorm_is_the_formula_and_computes_in_float32():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = randn(3, 5, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)
    # a bf16 model: bf16 out, normalised at float32 precision (the float32 result rounded once, then scaled)
    xb = (x * 300).bfloat16()
    out = norm.bfloat16()(xb)
    assert out.dtype == torch.bfloat16
    ref = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * norm.weight
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_make_norm_bias_follows_the_bias_setting():
    assert make_norm("layernorm", 8, 1e-5, bias=True).bias is not None
    assert make_norm("layernorm", 8, 1e-5, bias=False).bias is None
    assert isinstance(make_norm("rmsnorm", 8, 1e-6, bias=True), RMSNorm)  # RMSNorm has no bias at all
    assert make_norm("rmsnorm", 8, 1e-6, bias=True).eps == 1e-6


def test_rope_scores_depend_only_on_the_distance_between_positions():
    """RoPE's point (Su et al., 2021): q_m . k_n is a function of m - n, so shifting both by the same offset leaves
    every attention score unchanged, while a different distance changes it."""
    q, k = randn(1, 2, 6, 16, seed=1), randn(1, 2, 6, 16, seed=2)

    def scores(start_q, start_k):
        cq, sq = rope_angles(16, 10000.0, start_q, 6, "cpu")
        ck, sk = rope_angles(16, 10000.0, start_k, 6, "cpu")
        return apply_rope(q, cq, sq) @ apply_rope(k, ck, sk).transpose(-1, -2)

    torch.testing.assert_close(scores(0, 0), scores(37, 37), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores(3, 1), scores(40, 38), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0, 0), scores(3, 1), atol=1e-2)


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    """The half-split layout of Hugging Face's Llama: dimension i and i + hs/2 form a pair, turned by
    position * theta^(-2i / hs); norms of pairs are kept."""
    hd, theta, pos = 8, 100.0, 5
    x = randn(1, 1, 1, hd)
    cos, sin = rope_angles(hd, theta, pos, 1, "cpu")
    out = apply_rope(x, cos, sin)[0, 0, 0]
    for i in range(hd // 2):
        angle = torch.tensor(pos * theta ** (-2 * i / hd))
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + hd // 2]
        torch.testing.assert_close(out[i], a * angle.cos() - b * angle.sin())
        torch.testing.assert_close(out[i + hd // 2], b * angle.cos() + a * angle.sin())
    torch.testing.assert_close(apply_rope(x, *rope_angles(hd, theta, 0, 1, "cpu")), x)  # position 0: no turn


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_kv_heads():
    """Query head h reads key/value head h // (n_heads / n_kv_heads): the same as multi-head attention whose k and v
    weights repeat each shared head for its group."""
    torch.manual_seed(0)
    gqa = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=2, qkv_bias=True, bias=False, drop_rate=0.0)
    mha = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=4, qkv_bias=True, bias=False, drop_rate=0.0)
    hs = 8
    with torch.no_grad():
        for name in ("weight", "bias"):
            q, k, v = getattr(gqa.qkv, name).split([32, 16, 16])
            repeat = lambda t: t.view(2, hs, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(32, *t.shape[1:])  # noqa: E731
            getattr(mha.qkv, name).copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    assert gqa.qkv.weight.shape == (32 + 2 * 16, 32) and gqa.out_proj.bias is None
    x = randn(2, 7, 32, seed=3)
    rope = rope_angles(hs, 10000.0, 0, 7, "cpu")
    torch.testing.assert_close(gqa(x, rope), mha(x, rope), atol=1e-6, rtol=1e-5)


def test_multi_query_attention_is_causal():
    torch.manual_seed(0)
    mqa = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=1, qkv_bias=False, bias=True, drop_rate=0.0)
    x = randn(1, 6, 32)
    changed = x.clone()
    changed[:, 4] += 1.0
    a, b = mqa(x), mqa(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_is_the_gated_formula(bias):
    torch.manual_seed(0)
    mlp = MLP(emb_dim=16, hidden=40, kind="swiglu", bias=bias, drop_rate=0.0)
    x = randn(2, 3, 16)
    gate, up, down = mlp.gate, mlp.fc1, mlp.fc2
    expected = down(F.silu(gate(x)) * up(x))
    torch.testing.assert_close(mlp(x), expected)
    assert [n for n, _ in mlp.named_parameters()] == (
        ["gate.weight", "gate.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] if bias
        else ["gate.weight", "fc1.weight", "fc2.weight"])
    gelu = MLP(emb_dim=16, hidden=64, kind="gelu", bias=True, drop_rate=0.0)
    assert not hasattr(gelu, "gate")
    torch.testing.assert_close(gelu(x), gelu.fc2(F.gelu(gelu.fc1(x), approximate="tanh")))


def test_attention_dropout_is_off_in_eval_mode():
    """drop_rate drops attention weights in training only: in eval mode the layer is the one without dropout."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=4, qkv_bias=False, bias=False, drop_rate=0.5)
    x = randn(2, 6, 32)
    attn.eval()
    with torch.no_grad():
        dropped = attn(x)
        attn.drop_rate = 0.0
        torch.testing.assert_close(dropped, attn(x), atol=0, rtol=0)
        attn.drop_rate = 0.5
        attn.train()
        assert not torch.allclose(attn(x), dropped)  # and on in training


def test_with_a_cache_new_queries_see_the_past_and_themselves_causally():
    """A chunk of several new positions after cached ones: the same outputs as attention over the whole sequence."""
    from llmtrain.model.gpt import GPTConfig, KVCache

    torch.manual_seed(0)
    attn = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=2, qkv_bias=False, bias=False, drop_rate=0.0)
    x = randn(1, 9, 32)
    cache = KVCache(GPTConfig(vocab_size=8, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=1), 1, 9, "cpu",
                    torch.float32)
    full = attn(x, rope_angles(8, 10000.0, 0, 9, "cpu"))
    parts = []
    for start, end in ((0, 4), (4, 8), (8, 9)):  # a prompt, a chunk after it, one more token
        parts.append(attn(x[:, start:end], rope_angles(8, 10000.0, start, end - start, "cpu"), cache))
        cache.pos = end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=1e-5)
