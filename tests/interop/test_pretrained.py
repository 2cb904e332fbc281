"""Weights to start from, by one name: a Hub download's preset, and where an adapter's base lies in Hugging Face's
layout (hf_folder). Loading each kind of source is tested with it (test_checkpoints, test_gpt2, test_llama)."""

from dataclasses import asdict

import torch

import llmtrain.interop.pretrained as pretrained
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import describe, hf_folder, load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)


def test_a_hub_download_names_its_preset_when_loaded_as_when_described(tmp_path, monkeypatch):
    torch.manual_seed(0)
    export_hf(GPT(GPTConfig(**TINY)), tmp_path / "snapshot", {"tokenizer": "bytes"})
    monkeypatch.setattr(pretrained, "download", lambda name, what: tmp_path / "snapshot")  # what the Hub would give
    expected = {"hub_name": "openai-community/gpt2-medium", "model_name": "gpt355m"}
    assert describe("openai-community/gpt2-medium").extra == expected
    assert load_pretrained("openai-community/gpt2-medium")[1].extra == expected
    assert load_pretrained(str(tmp_path / "snapshot"))[1].extra == {}  # a local folder is no download


def test_hf_folder_finds_the_weights_in_hugging_faces_layout(tmp_path, monkeypatch):
    """An adapter's base_model_name_or_path: a Hub name as it is, a folder or a run's export hf/ as an absolute
    path (the adapter is read from elsewhere), nothing for weights that only a .ckpt holds."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    export_hf(model, tmp_path / "run" / "hf", {"tokenizer": "bytes"})
    (tmp_path / "ckpt_run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "llmtrain": {"model_config": asdict(model.config)}},
               tmp_path / "ckpt_run" / "checkpoints" / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    export = str((tmp_path / "run" / "hf").resolve())
    assert hf_folder("gpt2") == "gpt2" and hf_folder("HuggingFaceTB/SmolLM-135M") == "HuggingFaceTB/SmolLM-135M"
    assert hf_folder("run") == hf_folder("run/hf") == hf_folder(str(tmp_path / "run")) == export
    assert hf_folder("ckpt_run") is None and hf_folder("ckpt_run/checkpoints/last.ckpt") is None


def test_weights_load_in_the_dtype_asked_without_a_random_init(tmp_path, monkeypatch):
    """bf16 files stay bf16 for a run that trains in bf16 (bit for bit, no float32 model in between), float32 by
    default; the GPT is allocated once and filled, never randomly initialised first; a tied head stays tied."""
    from safetensors.torch import load_file

    from llmtrain.interop.llama import export_llama
    from llmtrain.run.train import TRUE_PRECISIONS

    torch.manual_seed(0)
    config = GPTConfig(**TINY, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False,
                       tie_weights=True)
    export_llama(GPT(config).to(torch.bfloat16), "bytes", tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    normal, initialised = torch.nn.init.normal_, []

    def recording(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording)
    for dtype in (TRUE_PRECISIONS["bf16-true"], torch.float32):
        model, _ = load_pretrained(str(tmp_path / "bf16"), dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype} and model.tied
        assert torch.equal(model.tok_emb.weight.to(torch.bfloat16), stored["model.embed_tokens.weight"])
    assert initialised and set(initialised) == {"meta"}  # shapes only: no random numbers drawn
    export_hf(GPT(GPTConfig(**TINY)), tmp_path / "gpt2", {"tokenizer": "bytes"})  # GPT-2's loader too
    assert load_pretrained(str(tmp_path / "gpt2"), dtype=torch.bfloat16)[0].head.weight.dtype == torch.bfloat16
