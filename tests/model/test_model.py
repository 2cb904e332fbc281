"""The handwritten GPT: parameter counts, causality, generation and the KV cache."""

import pytest
import torch

from llmtrain.model.gpt import GPT, GPTConfig, sample_next

GPT2_SMALL = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12)


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=97, context_length=24, emb_dim=32, n_heads=4, n_layers=2) | kw
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_gpt2_small_parameter_counts():
    with torch.device("meta"):  # shapes only: no 163M-parameter allocation
        untied = GPT(GPTConfig(**GPT2_SMALL, qkv_bias=False, tie_weights=False))
        released = GPT(GPTConfig(**GPT2_SMALL, qkv_bias=True, tie_weights=True))
        tied_no_bias = GPT(GPTConfig(**GPT2_SMALL, qkv_bias=False, tie_weights=True))
    assert untied.num_params() == 163_009_536
    assert released.num_params() == 124_439_808  # GPT-2 124M as released: qkv bias, tied head
    # tying removes exactly the 50257 x 768 head; the qkv bias adds 12 x 2304
    assert untied.num_params() - tied_no_bias.num_params() == 50257 * 768
    assert released.num_params() - tied_no_bias.num_params() == 12 * 3 * 768


def test_tied_head_shares_the_embedding():
    m = tiny(tie_weights=True)
    assert m.tied


@pytest.mark.parametrize("tie", [True, False])
def test_tied_says_whether_the_head_shares_the_embeddings_weight(tie):
    m = tiny(tie_weights=tie)
    assert m.tied is tie and (m.head.weight is m.tok_emb.weight) is tie
    m.replace_head(3)  # a classifier's head is its own, whatever the config says
    assert m.tied is False and m.config.tie_weights is tie
    with pytest.raises(AttributeError):  # read-only: tying is decided by the config and replace_head
        m.tied = True


def test_residual_projections_use_scaled_init():
    m = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=256, n_heads=4, n_layers=8))
    expected = 0.02 / (2 * 8) ** 0.5
    assert abs(m.blocks[0].attn.out_proj.weight.std().item() - expected) < 0.2 * expected
    assert abs(m.blocks[0].mlp.fc2.weight.std().item() - expected) < 0.2 * expected
    assert abs(m.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.1 * 0.02


def test_causality_changing_token_t_leaves_earlier_logits_unchanged():
    m = tiny()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    a, b = m(idx), m(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_forward_shape_and_context_limit():
    m = tiny()
    assert m(torch.zeros(3, 24, dtype=torch.long)).shape == (3, 24, 97)
    with pytest.raises(ValueError, match="context_length=24"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match=r"model.emb_dim=100 is not divisible by model.n_heads=3"):
        GPTConfig(emb_dim=100, n_heads=3)


def test_kv_cache_greedy_equals_uncached():
    m = tiny()
    prompt = torch.randint(0, 97, (2, 5))
    cached = m.generate(prompt, 15, temperature=0, use_cache=True)
    uncached = m.generate(prompt, 15, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_cache_prefill_in_chunks_matches_full_forward():
    from llmtrain.model.gpt import KVCache

    m = tiny()
    idx = torch.randint(0, 97, (1, 12))
    cache = KVCache(m.config, 1, 12, "cpu", torch.float32)
    parts = [m(idx[:, :5], cache), m(idx[:, 5:9], cache), m(idx[:, 9:], cache)]
    assert torch.allclose(torch.cat(parts, dim=1), m(idx), atol=1e-5)


def test_generate_stops_at_end_of_text():
    m = tiny()
    with torch.no_grad():
        m.head.bias = None
        m.head.weight.zero_()
        m.head.weight[7] = 1.0  # every position prefers token 7
    m.ln_f.weight.data.fill_(0.0)
    m.ln_f.bias.data.fill_(1.0)
    out = m.generate(torch.zeros(1, 3, dtype=torch.long), 10, temperature=0, eos_id=7)
    assert out.tolist() == [[0, 0, 0, 7]]


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # p = 0.5: token 0 alone has ~0.67 of the mass, so nucleus sampling always picks it
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {0}
    assert sample_next(logits, 0.0).item() == 0


def test_nucleus_keeps_the_smallest_set_that_reaches_p():
    """Probabilities 0.4, 0.3, 0.2, 0.1: p=0.5 needs the first two (0.4 alone falls short), p=0.75 three."""
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    g = torch.Generator().manual_seed(0)
    for p, kept in ((0.5, {0, 1}), (0.75, {0, 1, 2}), (0.7, {0, 1}), (1.0, {0, 1, 2, 3})):
        picks = {sample_next(logits, 1.0, top_p=p, generator=g).item() for _ in range(300)}
        assert picks == kept, (p, picks)


def test_crop_context_keeps_the_first_positions():
    m = tiny()
    x = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(x)
        m.crop_context(10)
        torch.testing.assert_close(m(x), before)
    assert m.config.context_length == 10 and m.pos_emb.weight.shape == (10, 32)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 11, dtype=torch.long))


def test_set_drop_rate_reaches_every_dropout():
    m = tiny(drop_rate=0.0)
    m.set_drop_rate(0.25)
    assert m.config.drop_rate == 0.25
    assert all(d.p == 0.25 for d in m.modules() if isinstance(d, torch.nn.Dropout))
    assert all(b.attn.drop_rate == 0.25 for b in m.blocks)
    x = torch.randint(0, 97, (2, 16))
    m.train()
    assert not torch.equal(m(x), m(x))  # dropout is on in training


def test_replace_head_makes_a_classifier_untied_from_the_embedding():
    m = tiny(tie_weights=True)
    m.replace_head(3)
    assert m(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 3)
    assert not m.tied
    assert m.head.bias is None  # as GPT-2's GPT2ForSequenceClassification.score: it exports unchanged


def test_prefill_sends_only_the_last_prompt_position_through_the_head():
    m = tiny()
    rows = []
    m.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    m.generate(torch.randint(0, 97, (2, 9)), 3, temperature=0)
    assert rows == [(2, 32)] * 3  # prompt (9 positions) and each new token: one position per row


def test_config_takes_drop_rates_in_zero_to_one_excluded():
    assert GPTConfig(drop_rate=0.0).drop_rate == 0.0 and GPTConfig(drop_rate=0.99).drop_rate == 0.99
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"model.drop_rate must lie in \[0, 1\), got {bad}"):
            GPTConfig(drop_rate=bad)


def test_rows_that_ended_are_padded_with_eos_while_the_others_go_on():
    m = tiny()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    free = m.generate(prompt, 8, temperature=0, use_cache=False)  # greedy, no end-of-text
    eos = free[0, 4].item()  # row 0's first new token
    assert eos not in free[1, 4:].tolist() and set(free[0, 5:].tolist()) != {eos}  # the case this test is about
    out = m.generate(prompt, 8, temperature=0, eos_id=eos)
    assert out[0, 4:].tolist() == [eos] * 8
    assert torch.equal(out[1], free[1])


def test_temperature_divides_the_logits():
    """Two tokens whose logits differ by 2: at temperature 0.5 the likelier is drawn with probability sigmoid(4),
    at temperature 2 with sigmoid(1)."""
    logits = torch.tensor([[0.0, 2.0]]).expand(4000, 2)
    for temperature, p in ((0.5, torch.tensor(4.0).sigmoid()), (2.0, torch.tensor(1.0).sigmoid())):
        drawn = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
        assert abs(drawn.float().mean().item() - p.item()) < 0.02, temperature


def test_crop_context_takes_one_to_the_current_length():
    m = tiny()
    m.crop_context(24)  # the length it has: nothing changes
    assert m.config.context_length == 24 and m.pos_emb.weight.shape == (24, 32)
    for bad in (0, 25):
        with pytest.raises(ValueError, match=rf"can only crop to 1..24 positions, got {bad}"):
            m.crop_context(bad)
