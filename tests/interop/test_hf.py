"""Hugging Face in and out by family: which layout an export takes, which reader a folder or a Hub name goes to."""

import json

import pytest
import torch

from llmtrain.errors import UserError
from llmtrain.interop.hf import export_hf, hub_preset
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, n_kv_heads=1)


def test_hub_names_map_to_the_presets_of_their_shapes():
    assert [hub_preset(n) for n in ("gpt2", "openai-community/gpt2", "openai-community/gpt2-medium", "gpt2-xl",
                                    "HuggingFaceTB/SmolLM-135M")] == [
        "gpt124m", "gpt124m", "gpt355m", "gpt1558m", "smollm_135m"]
    assert [hub_preset(n) for n in ("bert-base-uncased", "SmolLM-135M", "openai-community/gpt3")] == [None] * 3


def test_a_llama_option_model_is_exported_as_llama_with_its_record(tmp_path):
    """The run's record (stage, step) and the exact config (drop_rate, which config.json does not hold) come back."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **LLAMA, drop_rate=0.1)).eval()
    out = export_hf(model, tmp_path / "hf", {"tokenizer": "bytes", "stage": "instruct", "step": 12,
                                             "prompt_template": "alpaca"})
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "llmtrain.json").read_text())["model_config"]["drop_rate"] == 0.1
    loaded, info = load_pretrained(str(out))
    assert loaded.config == model.config
    assert (info.stage, info.step, info.prompt_template) == ("instruct", 12, "alpaca")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_describe_reads_the_config_and_no_weights(tmp_path):
    torch.manual_seed(0)
    out = export_hf(GPT(GPTConfig(**TINY, **LLAMA)), tmp_path / "hf", {"tokenizer": "bytes"})
    (out / "model.safetensors").unlink()  # what describe must not need
    info = describe(str(out))
    assert (info.kind, info.model_config.pos_emb, info.model_config.n_kv_heads) == ("hf", "rope", 1)
    with pytest.raises(UserError, match="no model.safetensors"):
        load_pretrained(str(out))


def test_a_model_of_neither_layout_is_refused_naming_both(tmp_path):
    model = GPT(GPTConfig(**TINY, pos_emb="rope"))  # rope with GPT-2's layernorm and GELU
    with pytest.raises(UserError, match=r"^the model has no Hugging Face layout: model\.pos_emb=rope is neither "
                                        r"GPT-2's nor \(with pos_emb=rope, norm=rmsnorm, mlp=swiglu\) Llama's"):
        export_hf(model, tmp_path / "hf", {"tokenizer": "bytes"})
    assert not (tmp_path / "hf").exists()
