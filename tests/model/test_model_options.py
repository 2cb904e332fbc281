"""The GPT with the Llama family's options: parameter counts, the GQA KV cache, FLOPs, generation, config checks."""


import pytest
import torch
import yaml
from conftest import ROOT

from llmtrain.model.gpt import GPT, GPTConfig, KVCache
from llmtrain.training.flops import training_flops

CONF = ROOT / "conf" / "model"
LLAMA = dict(vocab_size=97, context_length=24, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, pos_emb="rope",
             norm="rmsnorm", mlp="swiglu", mlp_hidden=48, bias=False, tie_weights=True)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(LLAMA | kw))).eval()


def preset(name: str) -> GPTConfig:
    return GPTConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


def test_smollm_135m_preset_has_the_released_parameter_count():
    """SmolLM-135M as released: 134,515,008 parameters; each piece counted from its shape."""
    config = preset("smollm_135m")
    with torch.device("meta"):
        model = GPT(config)
    d, kv, h = 576, 3 * 64, 1536
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * h + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm gains
    assert model.num_params() == 49152 * d + 30 * per_layer + d == 134_515_008
    assert model.pos_emb is None and not any(n.endswith(".bias") for n, _ in model.named_parameters())
    assert (config.n_kv_heads, config.mlp_hidden, config.rope_theta, config.norm_eps) == (3, 1536, 10000.0, 1e-5)


def test_llama_tiny_is_about_gpt_tinys_size():
    with torch.device("meta"):
        gpt, llama = GPT(preset("gpt_tiny")), GPT(preset("llama_tiny"))
    assert abs(llama.num_params() / gpt.num_params() - 1) < 0.01
    assert preset("gpt_tiny").n_kv_heads == 4 and preset("gpt_tiny").mlp_hidden == 512  # null: derived


def test_every_model_preset_lists_every_setting():
    settings = set(GPTConfig.__dataclass_fields__)
    for file in CONF.glob("*.yaml"):
        assert set(yaml.safe_load(file.read_text())) == settings, file.name


def test_derived_defaults():
    assert GPTConfig(emb_dim=96, n_heads=6).n_kv_heads == 6
    assert GPTConfig(emb_dim=96, n_heads=6).mlp_hidden == 384  # gelu: 4 x
    assert GPTConfig(emb_dim=576, n_heads=9, mlp="swiglu").mlp_hidden == 1536  # 8/3 x, a multiple of 64
    assert GPTConfig(emb_dim=128, n_heads=4, mlp="swiglu").mlp_hidden == 384  # 341.3 rounded up to 6 x 64


def test_kv_cache_holds_only_the_kv_heads():
    mha, gqa, mqa = (KVCache(GPTConfig(**(LLAMA | {"n_kv_heads": n})), 2, 24, "cpu", torch.float32) for n in (4, 2, 1))
    size = lambda c: sum(t.numel() * t.element_size() for t in c.k + c.v)  # noqa: E731
    assert mha.k[0].shape == (2, 4, 24, 8) and gqa.k[0].shape == (2, 2, 24, 8) and mqa.k[0].shape == (2, 1, 24, 8)
    assert size(mha) == 2 * size(gqa) == 4 * size(mqa) == 2 * 2 * 2 * 4 * 24 * 8 * 4  # k+v, layers, B, nh, T, hs, fp32


LLAMA3_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}
QWEN3 = dict(head_dim=12, qk_norm=True, n_kv_heads=2)  # heads wider than emb_dim / n_heads = 8


def test_kv_cache_holds_kv_heads_of_head_dim():
    cache = KVCache(GPTConfig(**(LLAMA | QWEN3)), 2, 24, "cpu", torch.float32)
    assert cache.k[0].shape == cache.v[0].shape == (2, 2, 24, 12)  # B, n_kv_heads, T, head_dim
    assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == 2 * 2 * 2 * 2 * 24 * 12 * 4


def test_head_dim_qk_norm_and_rope_scaling_add_only_their_own_weights():
    """head_dim resizes q, k, v and o only; QK-norm adds two gains of head_dim per layer; rope_scaling and the
    derived head_dim add nothing (and a preset's count is unchanged by the new settings)."""
    d, L, kv, hd = 32, 2, 2, 12
    base = tiny().num_params()
    assert tiny(head_dim=8).num_params() == tiny(rope_scaling=LLAMA3_SCALING).num_params() == base
    wide = tiny(head_dim=hd).num_params()
    assert wide - base == L * ((4 * hd + 2 * kv * hd) * d + 4 * hd * d - (2 * d * d + 2 * d * 16))
    assert tiny(head_dim=hd, qk_norm=True).num_params() - wide == L * 2 * hd
    assert GPTConfig(**LLAMA).head_dim == 8  # derived, and stored


@pytest.mark.parametrize("options", [{"n_kv_heads": 4}, {"n_kv_heads": 2}, {"n_kv_heads": 1}, QWEN3,
                                     {"rope_scaling": LLAMA3_SCALING},
                                     {"qkv_bias": True, "rope_scaling": {"type": "linear", "factor": 2.0}}],
                         ids=["mha", "gqa", "mqa", "qwen3", "llama3-scaling", "qwen2-linear"])
def test_cached_generation_equals_uncached(options):
    m = tiny(**options)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.generate(prompt, 15, temperature=0, use_cache=True),
                       m.generate(prompt, 15, temperature=0, use_cache=False))
    idx = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = KVCache(m.config, 1, 12, "cpu", torch.float32)
    parts = [m(idx[:, :5], cache), m(idx[:, 5:6], cache), m(idx[:, 6:], cache)]  # chunks continue the positions
    torch.testing.assert_close(torch.cat(parts, dim=1), m(idx), atol=1e-5, rtol=0)


def test_rope_model_has_no_position_table_and_is_causal():
    m = tiny()
    assert m.pos_emb is None and "pos_emb.weight" not in m.state_dict()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    a, b = m(idx), m(changed)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])
    # positions matter: the same tokens in another order give other logits at the last position
    assert not torch.allclose(m(idx.flip(1))[:, -1], m(idx)[:, -1])


def test_crop_context_of_a_rope_model_lowers_the_limit():
    m = tiny()
    x = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    before = m(x)
    m.crop_context(10)
    assert m.config.context_length == 10
    torch.testing.assert_close(m(x), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="context_length=10"):
        m(torch.zeros(1, 11, dtype=torch.long))


def test_flops_per_token_counts_every_matmul_weight():
    """6 per weight that multiplies (q, k, v, o, gate, up, down and the head) + 12 * layers * width * T; norm gains
    count too (as GPT-2's LayerNorm always did): 6 per parameter, the embedding lookup excepted."""
    for tied in (True, False):
        m = tiny(tie_weights=tied)
        d, kv, h, L, V, T = 32, 16, 48, 2, 97, 24
        weights = L * (d * d + 2 * d * kv + d * d + 3 * d * h + 2 * d) + d + V * d
        assert training_flops(m, L, d).of_batch(1, T) == 6 * weights + 12 * L * d * T


def test_gradient_checkpointing_gives_the_same_gradients_with_rope():
    grads = []
    for checkpointing in (False, True):
        m = tiny().train()
        m.gradient_checkpointing = checkpointing
        idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
        m(idx).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=4, n_kv_heads=3), r"model.n_heads=4 is not divisible by model.n_kv_heads=3: .*model.n_kv_heads=2"),
    (dict(emb_dim=36, n_heads=4), r"model.pos_emb=rope turns pairs of dimensions, but a head has head_dim=9 "),
    (dict(norm="batchnorm", mlp="relu"), r"model.norm='batchnorm' is not known: choose layernorm or rmsnorm; "
                                         r"model.mlp='relu' is not known: choose gelu or swiglu"),
    (dict(rope_theta=0.0, norm_eps=-1.0), r"model.rope_theta must be positive, got 0.0; model.norm_eps must be"),
    (dict(n_kv_heads=0, mlp_hidden=0), r"model.n_kv_heads must be a positive integer, got 0; model.mlp_hidden"),
    # a size that is not a whole number passed every check and failed inside the model with a TypeError
    (dict(emb_dim=128.5), r"^model.emb_dim must be a positive integer, got 128.5$"),
    (dict(n_heads=2.0, n_layers=True), r"^model.n_heads must be a positive integer, got 2.0; model.n_layers must be "
                                       r"a positive integer, got True$"),
    (dict(emb_dim=30, n_heads=4), r"model.emb_dim=30 is not divisible by model.n_heads=4: .*\(e.g. model.n_heads=3\), "
                                  r"or set model.head_dim$"),
    (dict(head_dim=7), r"^model.pos_emb=rope turns pairs of dimensions, but a head has head_dim=7 dimensions, an odd "
                       r"number: change model.head_dim"),
    (dict(head_dim=0), r"^model.head_dim must be a positive integer, got 0$"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"^model.rope_scaling has type='yarn': give null or a "
                                                         r"mapping with type linear or llama3 \(and its numbers"),
    (dict(rope_scaling=4.0), r"^model.rope_scaling has 4.0: give null or a mapping"),
    (dict(rope_scaling={"type": "linear", "factor": 2, "low_freq_factor": 1}),
     r"^model.rope_scaling.low_freq_factor is not read by linear scaling: drop it \(it reads factor\)$"),
    (dict(rope_scaling={"type": "llama3", "factor": 8}),
     r"^model.rope_scaling.low_freq_factor is missing: llama3 scaling reads factor, low_freq_factor, "
     r"high_freq_factor, original_max_position_embeddings; model.rope_scaling.high_freq_factor is missing"),
    (dict(rope_scaling={"type": "linear", "factor": 0}), r"^model.rope_scaling.factor must be a positive number, "
                                                         r"got 0$"),
    (dict(rope_scaling=LLAMA3_SCALING | {"low_freq_factor": 4.0}),
     r"^model.rope_scaling.low_freq_factor=4.0 must be below high_freq_factor=4.0 \(Llama 3.1: 1 and 4\)$"),
    (dict(pos_emb="learned", rope_scaling={"type": "linear", "factor": 2}),
     r"^model.rope_scaling rescales rotary positions, but model.pos_emb=learned: set model.pos_emb=rope, or "
     r"model.rope_scaling=null$"),
])
def test_config_refuses_what_cannot_be_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**(LLAMA | overrides))


@pytest.mark.slow
def test_llama_tiny_trains_from_the_command_line(tmp_path):
    """python -m llmtrain model=llama_tiny, shrunk as the other command-line tests are (4 query heads sharing 2
    key/value heads): the loss falls, and the checkpoint and export describe the Llama options."""
    from conftest import TINY, read_scalars, run_cli

    from llmtrain.interop.pretrained import load_pretrained

    run_dir = tmp_path / "run"
    args = ["model=llama_tiny", *TINY, "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_hidden=64",
            f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    val = [v for _, v in sorted(read_scalars(run_dir)["val/loss"])]
    assert len(val) == 2 and val[-1] < val[0] < 5.6  # ln(257): a uniform guess over the bytes
    model, info = load_pretrained(str(run_dir / "hf"))  # the run's export, in LlamaForCausalLM's layout
    c = model.config
    assert (c.pos_emb, c.norm, c.mlp, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.bias) == (
        "rope", "rmsnorm", "swiglu", 4, 2, 64, False)
    assert info.tokenizer == "bytes" and model.pos_emb is None
    assert '"LlamaForCausalLM"' in (run_dir / "hf" / "config.json").read_text()
