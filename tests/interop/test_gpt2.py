"""Hugging Face GPT-2 in: parity with a tiny random transformers GPT-2, sharded and bare layouts, bad folders."""

import json

import pytest
import torch
import transformers

from llmtrain.errors import UserError
from llmtrain.interop.gpt2 import GPT2_NAMES
from llmtrain.interop.pretrained import describe, load_pretrained

TINY_HF = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)


def save_hf(path, sharded: bool = False, **overrides):
    """A random tiny GPT2LMHeadModel saved in save_pretrained layout; returns it in eval mode."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**(TINY_HF | overrides))).eval()
    kwargs = {"max_shard_size": "100KB"} if sharded else {}
    hf.save_pretrained(path, safe_serialization=True, **kwargs)
    return hf


def ids(vocab: int, n: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # 0.1 is HF's default resid/embd/attn_pdrop; eval mode disables it
def test_hf_directory_matches_transformers_logits(tmp_path, dropout):
    hf = save_hf(tmp_path, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model, info = load_pretrained(str(tmp_path))
    assert info.kind == "hf" and info.tokenizer == "gpt2" and describe(str(tmp_path)) == info
    assert not model.training
    cfg = model.config
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (64, 2, 4, 32, 100)
    assert cfg.qkv_bias and cfg.tie_weights and model.tied
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_untied_hf_head_is_loaded(tmp_path):
    hf = save_hf(tmp_path, tie_word_embeddings=False)
    model, _ = load_pretrained(str(tmp_path))
    assert not model.config.tie_weights and not model.tied
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_sharded_hf_directory_loads(tmp_path):
    hf = save_hf(tmp_path, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_pretrained(str(tmp_path))
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_hf_keys_without_transformer_prefix(tmp_path):
    """A bare GPT2Model save (keys 'h.0...', no 'transformer.') loads too; its head is the tied wte."""
    hf = save_hf(tmp_path / "lm")
    hf.transformer.save_pretrained(tmp_path / "bare", safe_serialization=True)
    model, _ = load_pretrained(str(tmp_path / "bare"))
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_hf_shapes_that_disagree_with_config_json(tmp_path):
    save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_positions": 16, "n_layer": 1}))
    with pytest.raises(UserError) as e:
        load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert f"init_from={tmp_path}" in msg
    assert "wpe.weight (32, 64) but config.json implies (16, 64)" in msg
    assert "unexpected tensors h.1." in msg and "and 7 more" in msg


def test_hf_missing_weights_file(tmp_path):
    save_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"init_from=.*no model\.safetensors"):
        load_pretrained(str(tmp_path))


def test_hub_name_offline_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"init_from=gpt2: the weights could not be downloaded.*save_pretrained"):
        load_pretrained("gpt2")


def test_hub_names_map_to_model_configs():
    from llmtrain.cli import CONF_DIR

    for name in GPT2_NAMES.values():
        assert (CONF_DIR / "model" / f"{name}.yaml").is_file()
