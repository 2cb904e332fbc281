"""python -m llmtrain.export source=... out_dir=...: checkpoints and exports made before become Hugging Face folders;
bad input is one line and exit status 2, and nothing that is not an export is overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import transformers
from conftest import subprocess_env, write_hostile_folder

from llmtrain.export import main
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run import memory

TINY = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(TINY | overrides))).eval()


def save_ckpt(path, model: GPT, **meta):
    """A checkpoint as LanguageModel writes it (the weights under `model.`, the llmtrain record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model_config": asdict(model.config), "tokenizer": "bytes", "stage": "pretrain",
              "step": 7} | meta
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "llmtrain": record}, path)
    return path


def tokens() -> torch.Tensor:
    return torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))


def test_a_run_dir_becomes_a_folder_transformers_loads(tmp_path, capsys):
    model = tiny(tie_weights=True)
    save_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", model, init_from_digest="sha256:ab")
    main([f"source={tmp_path / 'run'}", f"out_dir={tmp_path / 'out'}"])
    line = capsys.readouterr().out
    assert line.startswith(f"exported {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} (a language model, ")
    assert line.rstrip().endswith(f"to {tmp_path / 'out'}: transformers' AutoModelForCausalLM and AutoTokenizer "
                                  "load it")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, model(tokens()), atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("hi")["input_ids"] == [104, 105]
    loaded, info = load_pretrained(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert (info.tokenizer, info.stage, info.step) == ("bytes", "pretrain", 7)
    assert info.init_from_digest == "sha256:ab"  # what the run started from, by content too (interop/digest.py)


def test_an_instruct_checkpoint_keeps_its_prompt_template(tmp_path, capsys):
    """llmtrain.json carries the record on: generate wraps prompts in the template the model was tuned on."""
    ckpt = save_ckpt(tmp_path / "last.ckpt", tiny(), stage="instruct", prompt_template="alpaca")
    main([f"source={ckpt}", f"out_dir={tmp_path / 'out'}"])
    meta = json.loads((tmp_path / "out" / "llmtrain.json").read_text())
    assert (meta["prompt_template"], meta["stage"], meta["step"]) == ("alpaca", "instruct", 7)
    _, info = load_pretrained(str(tmp_path / "out"))
    assert (info.prompt_template, info.stage) == ("alpaca", "instruct")


def test_a_classifier_is_exported_with_its_labels_for_sequence_classification(tmp_path, capsys):
    model = tiny()
    model.replace_head(2)
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, stage="classify", num_classes=2, label_names=["neg", "pos"])
    main([f"source={ckpt}", f"out_dir={tmp_path / 'out'}"])
    line = capsys.readouterr().out
    assert line == (f"exported {ckpt} (a classifier of neg, pos, {model.num_params():,} parameters, tokenizer bytes) "
                    f"to {tmp_path / 'out'}: transformers' AutoModelForSequenceClassification and AutoTokenizer load "
                    f"it\n")
    meta = json.loads((tmp_path / "out" / "llmtrain.json").read_text())
    assert (meta["stage"], meta["num_classes"], meta["label_names"]) == ("classify", 2, ["neg", "pos"])
    _, info = load_pretrained(str(tmp_path / "out"))
    assert (info.num_classes, info.label_names) == (2, ["neg", "pos"])


def run_export(*args: str, cwd) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("LLMTRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmtrain.export", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_bad_input_is_one_line_and_nothing_is_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    ckpt = save_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", tiny())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "notes" / "config.json").write_text("{}")
    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    cases = [
        ([ckpt], "error: out_dir is not set: give out_dir=..., the folder to write"),
        ([tmp_path / "nope", tmp_path / "out"], f"error: source={tmp_path / 'nope'}: no such file or directory, nor "
                                                "a known Hub name; source accepts"),
        ([tmp_path / "broken.ckpt", tmp_path / "out"], f"error: source={tmp_path / 'broken.ckpt'} cannot be read: "
                                                       "it is truncated, corrupt or not"),
        ([ckpt, tmp_path / "notes"], f"error: {tmp_path / 'notes'} holds config.json that llmtrain did not write: "
                                     "write into another folder, or pass overwrite=true"),
        ([ckpt, tmp_path / "broken.ckpt"], f"error: {tmp_path / 'broken.ckpt'} exists and is not a folder"),
    ]
    for paths, message in cases:
        with pytest.raises(SystemExit) as e:
            main([f"{key}={path}" for key, path in zip(("source", "out_dir"), paths)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    monkeypatch.setattr(memory, "available_ram", lambda: 64 * 2**30)
    with pytest.raises(SystemExit) as e:
        main([f"source={write_hostile_folder(tmp_path / 'hostile')}", f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: source={tmp_path / 'hostile'} describes a model of 113,984,065,664 parameters "
                          "(n_layers=1000000, emb_dim=64, vocab_size=1000000000) that needs about 1,274.4 GiB to load "
                          "and export (weights 1,273.87, decoding 0.00), but this machine has 64.0 GiB"), err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "notes" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ckpt", "hostile", "notes", "run"]
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "last.ckpt"]


@pytest.mark.slow
def test_the_command_line(tmp_path):
    """The real process: one line on success; a mistake is one line on stderr, exit 2, no traceback."""
    ckpt = save_ckpt(tmp_path / "last.ckpt", tiny())
    good = run_export(f"source={ckpt}", "out_dir=out", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"exported {ckpt} (a language model, ") and good.stdout.count("\n") == 1
    assert json.loads((tmp_path / "out" / "llmtrain.json").read_text())["exported_from"] == str(ckpt)
    bad = run_export(f"source={tmp_path / 'missing.ckpt'}", "out_dir=other", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(f"error: source={tmp_path / 'missing.ckpt'}: no such file or directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "out"]


def test_an_export_can_be_exported_again_in_place(tmp_path, capsys):
    model = tiny()
    main([f"source={save_ckpt(tmp_path / 'last.ckpt', model)}", f"out_dir={tmp_path / 'out'}"])
    main([f"source={tmp_path / 'out'}", f"out_dir={tmp_path / 'out'}"])  # read whole before it is replaced
    assert json.loads((tmp_path / "out" / "llmtrain.json").read_text())["exported_from"] == str(tmp_path / "out")
    loaded, _ = load_pretrained(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
