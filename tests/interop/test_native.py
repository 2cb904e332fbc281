"""Exports of the earlier format (`<run>/model`: config.json with "format": "llmtrain" + our safetensors names),
which runs wrote before the Hugging Face export: they still load exactly, classifiers with a biased head too."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.native import load_export
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)
META = {"tokenizer": "bytes", "task": "lm", "stage": "pretrain", "step": 30, "init_from": None}


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(TINY | overrides))).eval()


def old_classifier(n: int = 3) -> GPT:
    """A classifier as the classify stage made it before heads became bias-free."""
    model = tiny(tie_weights=True)
    model.head = torch.nn.Linear(32, n, bias=True)
    with torch.no_grad():
        model.head.bias.normal_()
    return model.eval()


def write_old_export(model: GPT, out: Path, meta: dict) -> Path:
    """What export_model wrote to <run>/model before the Hugging Face export replaced it."""
    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"), force_contiguous=True)  # a tied pair is stored once
    num_classes = model.head.out_features if meta.get("task") == "classify" else None
    config = {"format": "llmtrain", "model_config": asdict(model.config), "num_classes": num_classes} | meta
    (out / "config.json").write_text(json.dumps(config))
    return out


def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(tokens()), b(tokens()))


@pytest.mark.parametrize("tied", [False, True])
def test_an_old_export_loads_exactly_without_pickle(tmp_path, tied, monkeypatch):
    model = tiny(tie_weights=tied)
    out = write_old_export(model, tmp_path / "model", META)
    refuse = lambda *a, **k: pytest.fail("an export must load without pickle")
    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    loaded, info = load_export(out)
    assert (loaded.head.weight is loaded.tok_emb.weight) == tied and not loaded.training
    assert_same(model, loaded)
    assert info == ModelInfo(kind="llmtrain", path=str(out), model_config=model.config, tokenizer="bytes", task="lm",
                             stage="pretrain", step=30)


def test_an_old_classifier_folds_its_head_bias_into_the_final_norm(tmp_path):
    model = old_classifier()
    out = write_old_export(model, tmp_path / "model", META | {"task": "classify", "label_names": ["a", "b", "c"]})
    loaded, info = load_export(out)
    assert loaded.head.bias is None and info.num_classes == 3 and info.label_names == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()), model(tokens()), atol=1e-5, rtol=0)


def test_a_run_dir_with_only_its_old_export_loads_and_its_checkpoint_is_preferred(tmp_path):
    model = tiny()
    out = write_old_export(model, tmp_path / "run" / "model", META)
    loaded, info = load_pretrained(str(tmp_path / "run"))
    assert info.path == str(out)
    assert_same(model, loaded)
    other = tiny(seed=1)
    (tmp_path / "run" / "checkpoints").mkdir()
    torch.save({"state_dict": {"model." + k: v for k, v in other.state_dict().items()},
                "llmtrain": {"model_config": asdict(other.config), "tokenizer": "bytes"}},
               tmp_path / "run" / "checkpoints" / "last.ckpt")
    loaded, info = load_pretrained(str(tmp_path / "run"))
    assert info.path.endswith("last.ckpt")
    assert_same(other, loaded)


def _truncate(out: Path) -> None:
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])


def _other_shape(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    config["model_config"] |= {"emb_dim": 64, "n_layers": 3}
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, words", [
    (lambda out: (out / "model.safetensors").unlink(), "no model.safetensors next to config.json"),
    (lambda out: (out / "config.json").write_text("{not json"), "config.json is not readable JSON"),
    (_truncate, "is not a readable safetensors file"),
    (_other_shape, "the weights do not fit the model: missing keys blocks.2."),
], ids=["no-weights", "bad-json", "truncated", "wrong-shapes"])
def test_a_damaged_old_export_is_a_one_line_user_error(tmp_path, damage, words):
    out = write_old_export(tiny(), tmp_path / "model", META)
    damage(out)
    with pytest.raises(UserError) as e:
        load_export(out)
    assert str(out) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError) as e:  # the training entry point adds the key the user set
        load_pretrained(str(tmp_path))
    assert str(e.value).startswith(f"init_from={tmp_path}: ") and "\n" not in str(e.value)
