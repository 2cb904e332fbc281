"""The layers of the Llama options, each against a direct computation: RMSNorm, RoPE, grouped-query attention,
the SwiGLU MLP."""

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model.layers import (
    MLP,
    CausalSelfAttention,
    RMSNorm,
    apply_rope,
    make_norm,
    packed_positions,
    rope_angles,
    rope_frequencies,
)


def positions(start, n: int) -> torch.Tensor:
    """Positions start .. start + n - 1 (start: an int or a 0-d tensor)."""
    return torch.arange(n) + start


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
        cq, sq = rope_angles(16, 10000.0, positions(start_q, 6), "cpu")
        ck, sk = rope_angles(16, 10000.0, positions(start_k, 6), "cpu")
        return apply_rope(q, cq, sq) @ apply_rope(k, ck, sk).transpose(-1, -2)

    torch.testing.assert_close(scores(0, 0), scores(37, 37), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores(3, 1), scores(40, 38), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0, 0), scores(3, 1), atol=1e-2)


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    """The half-split layout of Hugging Face's Llama: dimension i and i + hs/2 form a pair, turned by
    position * theta^(-2i / hs); norms of pairs are kept."""
    hd, theta, pos = 8, 100.0, 5
    x = randn(1, 1, 1, hd)
    cos, sin = rope_angles(hd, theta, positions(pos, 1), "cpu")
    out = apply_rope(x, cos, sin)[0, 0, 0]
    for i in range(hd // 2):
        angle = torch.tensor(pos * theta ** (-2 * i / hd))
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + hd // 2]
        torch.testing.assert_close(out[i], a * angle.cos() - b * angle.sin())
        torch.testing.assert_close(out[i + hd // 2], b * angle.cos() + a * angle.sin())
    torch.testing.assert_close(apply_rope(x, *rope_angles(hd, theta, positions(0, 1), "cpu")), x)  # position 0: no turn


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
    rope = rope_angles(hs, 10000.0, positions(0, 7), "cpu")
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
    full = attn(x, rope_angles(8, 10000.0, positions(0, 9), "cpu"))
    parts = []
    for start, end in ((0, 4), (4, 8), (8, 9)):  # a prompt, a chunk after it, one more token
        parts.append(attn(x[:, start:end], rope_angles(8, 10000.0, positions(start, end - start), "cpu"), cache))
        cache.pos = end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=1e-5)


def test_heads_of_their_own_width_project_q_k_v_to_heads_times_head_dim_and_back():
    """head_dim apart from emb_dim / n_heads (Qwen3): q, k, v are n_heads (n_kv_heads) x head_dim wide and out_proj
    maps n_heads x head_dim back to emb_dim; attention is then softmax(q k^T / sqrt(head_dim)) v per head."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(emb_dim=24, n_heads=4, n_kv_heads=2, qkv_bias=True, bias=False, drop_rate=0.0,
                               head_dim=10)
    assert attn.qkv.weight.shape == (4 * 10 + 2 * 2 * 10, 24) and attn.out_proj.weight.shape == (24, 40)
    x = randn(2, 5, 24, seed=4)
    q, k, v = attn.qkv(x).split([40, 20, 20], dim=-1)
    q = q.view(2, 5, 4, 10).transpose(1, 2)
    k, v = (t.view(2, 5, 2, 10).transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / 10**0.5).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 40))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_qk_norm_normalises_each_heads_query_and_key():
    """With QK-norm, scaling the q and k rows of the projection changes nothing (each head's query and key are
    RMS-normalised first); without, it sharpens the attention. The gains are one per dimension of a head."""
    torch.manual_seed(0)
    x = randn(1, 6, 32, seed=5)
    rope = rope_angles(8, 10000.0, positions(0, 6), "cpu")
    for eps, unchanged in ((1e-6, True), (None, False)):
        attn = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=2, qkv_bias=False, bias=False, drop_rate=0.0,
                                   qk_norm_eps=eps)
        before = attn(x, rope)
        with torch.no_grad():
            attn.qkv.weight[:48] *= 5.0  # the q and k rows
        assert torch.allclose(attn(x, rope), before, atol=1e-5) == unchanged
    assert attn.qkv.weight.shape == (64, 32) and not hasattr(attn, "q_norm")
    normed = CausalSelfAttention(emb_dim=32, n_heads=4, n_kv_heads=2, qkv_bias=False, bias=False, drop_rate=0.0,
                                 qk_norm_eps=1e-6)
    assert normed.q_norm.weight.shape == normed.k_norm.weight.shape == (8,) and normed.k_norm.eps == 1e-6


def test_linear_rope_scaling_divides_every_frequency():
    plain = rope_frequencies(16, 500.0)
    torch.testing.assert_close(plain, 500.0 ** (-torch.arange(0, 16, 2) / 16))
    torch.testing.assert_close(rope_frequencies(16, 500.0, {"type": "linear", "factor": 4.0}), plain / 4)
    # positions interpolated: position 4p with the scaling turns as position p without it
    torch.testing.assert_close(rope_angles(16, 500.0, positions(8, 1), "cpu", {"type": "linear", "factor": 4.0})[0],
                               rope_angles(16, 500.0, positions(2, 1), "cpu")[0])


def test_llama3_rope_scaling_keeps_fast_pairs_slows_slow_ones_and_blends_between():
    """Against the pretraining context L = 32 (low 1, high 4): a pair whose wavelength 2 pi / f is under L / 4
    keeps f, one over L / 1 turns factor times slower, and one between blends the two by (L / wavelength - 1) / 3."""
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    plain, scaled = rope_frequencies(16, 500.0), rope_frequencies(16, 500.0, scaling)
    wavelength = 2 * torch.pi / plain
    regions = [(wavelength < 8).tolist(), ((wavelength >= 8) & (wavelength <= 32)).tolist(), (wavelength > 32).tolist()]
    assert regions[0][:1] == [True] and any(regions[1]) and any(regions[2])  # the test covers all three
    for i in range(8):
        if regions[0][i]:
            expected = plain[i]
        elif regions[2][i]:
            expected = plain[i] / 8
        else:
            blend = (32 / wavelength[i] - 1) / 3
            expected = (1 - blend) * plain[i] / 8 + blend * plain[i]
        torch.testing.assert_close(scaled[i], expected)


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.5},
    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2's
], ids=["linear", "llama3-tiny", "llama3.2"])
def test_rope_frequencies_equal_transformers(scaling):
    """The frequencies of transformers' own RoPE initialisation for the same configuration, bit for bit."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = (64, 500000.0) if scaling.get("original_max_position_embeddings") == 8192 else (16, 500.0)
    params = {"rope_type": scaling["type"], "rope_theta": theta} | {k: v for k, v in scaling.items() if k != "type"}
    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                      max_position_embeddings=64, rope_parameters=params)
    theirs, _ = ROPE_INIT_FUNCTIONS[scaling["type"]](config, "cpu")
    torch.testing.assert_close(rope_frequencies(head_dim, theta, scaling), theirs, atol=0, rtol=0)


def test_packed_positions_restart_per_record_and_attention_stays_inside_it():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])  # three records, then padding
    pos, mask = packed_positions(segments)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 6), (6, 8)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert mask.shape == (1, 1, 8, 8) and torch.equal(mask[0, 0], expected)
