"""The final export (config.json + model.safetensors): exact round trips, LoRA merged, atomic replace, loaders."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

import llmtrain.export as export
from llmtrain.checkpoints import ModelInfo
from llmtrain.errors import UserError
from llmtrain.export import export_model, load_export
from llmtrain.model import GPT, GPTConfig
from llmtrain.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)
META = {"tokenizer": "bytes", "task": "lm", "stage": "pretrain", "step": 30, "init_from": None}


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(TINY | overrides))).eval()


def classifier(seed: int = 0, n: int = 3) -> GPT:
    model = tiny(seed, tie_weights=True)
    model.replace_head(n)
    with torch.no_grad():
        model.head.weight.normal_()  # a trained head's classes differ clearly
    return model


def tokens(n: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, 16), generator=torch.Generator().manual_seed(1))


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Identical state dicts (keys, shapes, values) and identical logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(tokens()), b(tokens()))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tmp_path, tied):
    model = tiny(tie_weights=tied)
    out = export_model(model, tmp_path / "model", META)
    assert out == tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, info = load_export(out)
    assert loaded.config == model.config and not loaded.training
    assert (loaded.head.weight is loaded.tok_emb.weight) == tied
    assert_same(model, loaded)
    assert info == ModelInfo(kind="llmtrain", path=str(out), model_config=model.config, tokenizer="bytes", task="lm",
                             stage="pretrain", step=30)


def test_config_json_carries_the_model_config_and_meta(tmp_path):
    model = tiny()
    meta = META | {"task": "instruct", "prompt_template": "alpaca", "init_from": "outputs/runs/base",
                   "model_config": {"emb_dim": 1}}  # the weights decide model_config, not meta
    config = json.loads((export_model(model, tmp_path / "model", meta) / "config.json").read_text())
    assert config == {"format": "llmtrain", "model_config": asdict(model.config), "num_classes": None,
                      "tokenizer": "bytes", "task": "instruct", "stage": "pretrain", "step": 30,
                      "init_from": "outputs/runs/base", "prompt_template": "alpaca"}
    assert load_export(tmp_path / "model")[1].prompt_template == "alpaca"


def test_classifier_head_round_trip(tmp_path):
    model = classifier(n=3)
    out = export_model(model, tmp_path / "model", META | {"task": "classify", "label_names": ["a", "b", "c"]})
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    loaded, info = load_export(out)
    assert loaded.head.out_features == 3 and loaded.head.bias is None
    assert loaded.head.weight is not loaded.tok_emb.weight  # replace_head unties, also when the config ties
    assert_same(model, loaded)
    assert info.task == "classify" and info.label_names == ["a", "b", "c"] and info.num_classes == 3


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_lora_model_exports_merged_weights_and_stays_wrapped(tmp_path, task):
    from llmtrain.lora import apply_lora

    base = classifier() if task == "classify" else tiny(tie_weights=True)
    wrapped = apply_lora(copy.deepcopy(base), r=4, dropout=0.0,
                         modules_to_save=["head"] if task == "classify" else None).eval()
    with torch.no_grad():  # B starts at zero and the saved head as a copy: make both differ from the base
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}

    loaded, _ = load_export(export_model(wrapped, tmp_path / "model", META | {"task": task}))
    assert not any("lora_" in k or "modules_to_save" in k for k in loaded.state_dict())
    with torch.no_grad():
        expected = wrapped(tokens())
        torch.testing.assert_close(loaded(tokens()), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base(tokens()), expected, atol=1e-3)  # the adapters did change the output
    after = wrapped.state_dict()  # the wrapped model keeps its adapters and values
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_export_loads_without_pickle(tmp_path, monkeypatch):
    model = tiny(tie_weights=True)
    out = export_model(model, tmp_path / "model", META)
    header_len = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")  # safetensors framing
    assert json.loads((out / "model.safetensors").read_bytes()[8 : 8 + header_len])
    refuse = lambda *a, **k: pytest.fail("an export must load without pickle")
    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    assert_same(model, load_export(out)[0])


def test_load_pretrained_reads_exports_and_prefers_a_runs_checkpoint(tmp_path):
    model = tiny()
    out = export_model(model, tmp_path / "run" / "model", META)
    for init_from in (out, tmp_path / "run"):  # the export itself, a run dir that only has its export
        loaded, info = load_pretrained(str(init_from))
        assert_same(model, loaded)
        assert info.kind == "llmtrain" and info.path == str(out) and info.tokenizer == "bytes"
    other = tiny(seed=1)
    (tmp_path / "run" / "checkpoints").mkdir()
    torch.save({"state_dict": {"model." + k: v for k, v in other.state_dict().items()},
                "llmtrain": {"model_config": asdict(other.config), "tokenizer": "bytes"}},
               tmp_path / "run" / "checkpoints" / "last.ckpt")
    loaded, info = load_pretrained(str(tmp_path / "run"))
    assert info.path.endswith("last.ckpt")
    assert_same(other, loaded)


def test_second_export_replaces_the_first_whole(tmp_path, monkeypatch):
    first, second = tiny(seed=0), tiny(seed=1, n_layers=1)
    out = export_model(first, tmp_path / "model", META | {"step": 10})
    (out / "notes.txt").write_text("from the first export")
    (tmp_path / ".model.tmp-killed").mkdir()  # what a killed export leaves behind
    export_model(second, out, META | {"step": 20})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, info = load_export(out)
    assert_same(second, loaded)
    assert info.step == 20

    def dies_half_way(model, filename, **kwargs):  # a crash while the weights are being written
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_model", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_model(first, out, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the older export, untouched
    assert_same(second, load_export(out)[0])


def test_export_never_replaces_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_text("precious")
    with pytest.raises(UserError, match=r"run exists and is not an llmtrain export"):
        export_model(tiny(), tmp_path / "run", META)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "empty").mkdir()
    assert_same(tiny(), load_export(export_model(tiny(), tmp_path / "empty", META))[0])


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
    (_other_shape, "the weights do not fit config.json: missing tensors blocks.2."),
], ids=["no-weights", "bad-json", "truncated", "wrong-shapes"])
def test_a_damaged_export_is_a_one_line_user_error(tmp_path, damage, words):
    out = export_model(tiny(), tmp_path / "model", META)
    damage(out)
    with pytest.raises(UserError) as e:
        load_export(out)
    assert str(out) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError) as e:  # the training entry point adds the key the user set
        load_pretrained(str(tmp_path))
    assert str(e.value).startswith(f"init_from={tmp_path}: ") and "\n" not in str(e.value)


def run_generate(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("LLMTRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmtrain.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_generate_command_on_an_export(tmp_path):
    from llmtrain.generate import generate_text
    from llmtrain.tokenizer import build_tokenizer

    out = export_model(tiny(), tmp_path / "model", META)
    result = run_generate(f"ckpt_path={out}", "prompt=Hello", "max_new_tokens=5", "temperature=0", "device=cpu")
    assert result.returncode == 0, result.stderr
    expected = generate_text(load_export(out)[0], build_tokenizer("bytes"), "Hello", max_new_tokens=5,
                             temperature=0)
    assert result.stdout == expected + "\n"


@pytest.mark.slow
def test_generate_refuses_an_exported_classifier_and_wraps_instruct_prompts(tmp_path, monkeypatch):
    meta = META | {"task": "classify", "label_names": ["neg", "pos"]}
    export_model(classifier(n=2), tmp_path / "run" / "model", meta)
    result = run_generate(f"ckpt_path={tmp_path / 'run'}", "prompt=great film")  # a run dir holding only its export
    assert result.returncode == 2
    assert result.stderr == (f"error: ckpt_path={tmp_path / 'run'} is a classifier (labels: neg, pos): it predicts "
                             "labels, it does not generate text\n")

    import llmtrain.generate as gen
    from llmtrain.prompts import format_prompt

    out = export_model(tiny(), tmp_path / "instruct", META | {"task": "instruct", "prompt_template": "alpaca"})
    seen = []
    monkeypatch.setattr(gen, "generate_text", lambda model, tok, prompt, *a, **k: seen.append(prompt) or "ok")
    assert gen.run(gen.parse_args([f"ckpt_path={out}", "prompt=Name a colour", "device=cpu"])) == "ok"
    assert seen == [format_prompt("Name a colour")]
