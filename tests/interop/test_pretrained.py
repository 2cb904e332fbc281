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
