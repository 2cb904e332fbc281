"""Loading pretrained weights: parity with a tiny random transformers GPT-2, llmtrain checkpoints, bad inputs."""

import json
from dataclasses import asdict

import pytest
import torch

from llmtrain.errors import UserError
from llmtrain.finetune import HF_GPT2_NAMES, check_fits, crop_context, load_pretrained, strip_prefixes
from llmtrain.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

TINY_HF = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)
TINY = dict(vocab_size=97, context_length=24, emb_dim=32, n_heads=4, n_layers=2)


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
    assert info["kind"] == "hf" and info["tokenizer"] == "gpt2"
    assert not model.training
    cfg = model.config
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (64, 2, 4, 32, 100)
    assert cfg.qkv_bias and cfg.tie_weights and model.head.weight is model.tok_emb.weight
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_untied_hf_head_is_loaded(tmp_path):
    hf = save_hf(tmp_path, tie_word_embeddings=False)
    model, _ = load_pretrained(str(tmp_path))
    assert not model.config.tie_weights and model.head.weight is not model.tok_emb.weight
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


def fake_checkpoint(path, model: GPT, prefix: str = "model.") -> None:
    """What LanguageModel's checkpoints hold that matters here: the state dict under a prefix, and the config."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    meta = {"model_config": asdict(model.config), "tokenizer": "bytes", "task": "lm"}
    torch.save({"state_dict": state, "llmtrain": meta, "global_step": 3}, path)


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod.", "base_model.model.", "model.base_model.model."])
def test_llmtrain_checkpoint_round_trip(tmp_path, prefix):
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY, qkv_bias=True, tie_weights=True)).eval()
    fake_checkpoint(tmp_path / "x.ckpt", original, prefix)
    model, info = load_pretrained(str(tmp_path / "x.ckpt"))
    assert info == {"kind": "llmtrain", "tokenizer": "bytes", "task": "lm", "path": str(tmp_path / "x.ckpt")}
    assert model.config == original.config
    x = ids(97, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=0, rtol=0)


def test_run_directory_uses_last_ckpt(tmp_path):
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY)).eval()
    (tmp_path / "checkpoints").mkdir()
    fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", original)
    model, info = load_pretrained(str(tmp_path))
    assert info["path"] == str(tmp_path / "checkpoints" / "last.ckpt")
    x = ids(97, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=0, rtol=0)


def test_strip_prefixes():
    t = torch.zeros(1)
    sd = {"model.a": t, "model._orig_mod.b": t, "base_model.model.c": t, "_orig_mod.d": t, "e": t}
    assert list(strip_prefixes(sd)) == ["a", "b", "c", "d", "e"]


def test_checkpoint_with_python_objects_is_explained(tmp_path):
    torch.save({"state_dict": {}, "llmtrain": {}, "extra": GPTConfig()}, tmp_path / "obj.ckpt")
    with pytest.raises(UserError, match=r"init_from=.*obj\.ckpt.*Python objects.*GPTConfig.*weights_only"):
        load_pretrained(str(tmp_path / "obj.ckpt"))


def test_checkpoint_with_unexpected_and_missing_keys(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    state = {"model." + k: v for k, v in model.state_dict().items() if k != "ln_f.bias"}
    state["model.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(2, 32)
    torch.save({"state_dict": state, "llmtrain": {"model_config": asdict(model.config)}}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match=r"missing keys ln_f\.bias; unexpected keys blocks\.0\.attn\.qkv\.lora_A"):
        load_pretrained(str(tmp_path / "x.ckpt"))


def test_bad_inputs_name_init_from(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    cases = {
        str(tmp_path / "missing.ckpt"): "no such file or directory",
        str(tmp_path / "notes.txt"): "is not a PyTorch checkpoint",
        str(tmp_path / "empty"): "neither config.json nor checkpoints/last.ckpt",
        str(tmp_path / "llama"): "model_type='llama'",
        str(tmp_path / "plain.pt"): "not an llmtrain checkpoint",
    }
    for init_from, what in cases.items():
        with pytest.raises(UserError) as e:
            load_pretrained(init_from)
        msg = str(e.value)
        assert f"init_from={init_from}" in msg and what in msg and "\n" not in msg, msg


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
    from llmtrain.train import CONF_DIR

    for name in HF_GPT2_NAMES.values():
        assert (CONF_DIR / "model" / f"{name}.yaml").is_file()


def test_check_fits():
    gpt2 = GPTConfig(qkv_bias=True, tie_weights=True)  # GPT-2 124M shapes
    check_fits(gpt2, {"emb_dim": 768, "n_layers": 12, "context_length": 256, "drop_rate": 0.1})
    with pytest.raises(UserError) as e:
        check_fits(gpt2, {"emb_dim": 128, "n_heads": 12, "context_length": 2048})
    msg = str(e.value)
    assert "model.emb_dim=128 but the checkpoint has 768: pick model=gpt124m or drop the model override" in msg
    assert "model.context_length=2048" in msg and "model.context_length<=1024" in msg
    assert "n_heads" not in msg


def test_crop_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    x = ids(97, 10)
    with torch.no_grad():
        before = model(x)
        crop_context(model, 10)
        torch.testing.assert_close(model(x), before)
    assert model.config.context_length == 10 and model.pos_emb.weight.shape == (10, 32)
    with pytest.raises(ValueError):
        model(ids(97, 11))
