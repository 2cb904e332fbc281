"""llmtrain's checkpoint files: the self-description (ModelInfo), prefixes, safe loading, ckpt_path resolution."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import (
    ModelInfo,
    check_tensors,
    load_checkpoint,
    newest_loadable_checkpoint,
    read_info,
    resolve_ckpt_path,
    strip_prefixes,
)
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=97, context_length=24, emb_dim=32, n_heads=4, n_layers=2)


def ids(vocab: int, n: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def fake_checkpoint(path, model: GPT, prefix: str = "model.", **meta) -> None:
    """What LanguageModel's checkpoints hold that matters here: the state dict under a prefix, and the record."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    record = {"model_config": asdict(model.config), "tokenizer": "bytes"} | meta
    torch.save({"state_dict": state, "llmtrain": record, "global_step": 3}, path)


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod.", "base_model.model.", "model.base_model.model."])
def test_llmtrain_checkpoint_round_trip(tmp_path, prefix):
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY, qkv_bias=True, tie_weights=True)).eval()
    fake_checkpoint(tmp_path / "x.ckpt", original, prefix)
    model, info = load_pretrained(str(tmp_path / "x.ckpt"))
    assert info == ModelInfo(kind="llmtrain", path=str(tmp_path / "x.ckpt"), model_config=original.config,
                             tokenizer="bytes")
    assert model.config == original.config and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(ids(97)), original(ids(97)), atol=0, rtol=0)


def test_a_classifier_checkpoint_rebuilds_its_head(tmp_path):
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY))
    original.replace_head(3)
    fake_checkpoint(tmp_path / "c.ckpt", original.eval(), label_names=["a", "b", "c"],
                    num_classes=3, stage="classify", prompt_template=None, step=7)
    model, info = load_checkpoint(tmp_path / "c.ckpt", "init_from=c.ckpt")
    assert (info.num_classes, info.label_names, info.stage, info.step) == (
        3, ["a", "b", "c"], "classify", 7)
    assert model.head.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids(97)), original(ids(97)), atol=0, rtol=0)



@pytest.mark.parametrize("classifier", [False, True])
def test_a_lora_runs_checkpoint_loads_merged_as_peft_merges_it(tmp_path, classifier):
    """generate, evaluate, export and init_from read a LoRA run's checkpoint (its adapters and, for a classifier,
    the trained copy of the head) as the plain model peft's merge gives, with r and alpha from the run's config;
    without them, one line."""
    from llmtrain.interop.lora import apply_lora, merge

    torch.manual_seed(0)
    base = GPT(GPTConfig(**TINY, tie_weights=not classifier))
    if classifier:
        base.replace_head(3)
    wrapped = apply_lora(base, r=4, alpha=12, target_modules=["attn.qkv", "mlp.fc1"],
                         modules_to_save=["head"] if classifier else None)
    with torch.no_grad():  # trained adapters: lora_B starts at zero, which would merge to nothing
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    meta = {"config": {"finetune": {"lora": {"r": 4, "alpha": 12}}}}
    if classifier:
        meta |= {"num_classes": 3, "stage": "classify", "label_names": ["a", "b", "c"]}
    state = {"model." + k: v for k, v in wrapped.state_dict().items()}
    record = {"model_config": asdict(base.config), "tokenizer": "bytes"} | meta
    torch.save({"state_dict": state, "llmtrain": record}, tmp_path / "lora.ckpt")
    merged = merge(wrapped).eval()

    model, _ = load_checkpoint(tmp_path / "lora.ckpt", "ckpt_path=lora.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model(ids(97)), merged(ids(97)), atol=1e-6, rtol=0)
    record["config"] = {}
    torch.save({"state_dict": state, "llmtrain": record}, tmp_path / "bare.ckpt")
    with pytest.raises(UserError, match="holds LoRA adapters but records no finetune.lora r and alpha"):
        load_checkpoint(tmp_path / "bare.ckpt", "ckpt_path=bare.ckpt")


def test_read_info_reads_no_weights(tmp_path, monkeypatch):
    """The record alone, memory-mapped: what the config checks read before a run builds anything."""
    torch.manual_seed(0)
    fake_checkpoint(tmp_path / "x.ckpt", GPT(GPTConfig(**TINY)), stage="pretrain")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    info = read_info(tmp_path / "x.ckpt", "ckpt_path=x.ckpt")
    assert info.stage == "pretrain" and info.model_config == GPTConfig(**TINY)
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_run_directory_uses_last_ckpt(tmp_path):
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY)).eval()
    (tmp_path / "checkpoints").mkdir()
    fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", original)
    model, info = load_pretrained(str(tmp_path))
    assert info.path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert describe(str(tmp_path)).path == info.path
    with torch.no_grad():
        torch.testing.assert_close(model(ids(97)), original(ids(97)), atol=0, rtol=0)


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


def test_one_check_names_every_missing_unexpected_and_misshaped_tensor_in_one_line():
    """The check before every copy of weights (a checkpoint, a GPT-2 or a Llama folder): one wording, one line."""
    expected = {"wte.weight": torch.zeros(8, 4), "h.0.ln_1.weight": torch.zeros(4), "ln_f.weight": torch.zeros(4)}
    found = {"wte.weight": torch.zeros(6, 4), "ln_f.weight": torch.zeros(4), "h.9.mlp.c_fc.weight": torch.zeros(1)}
    with pytest.raises(UserError) as e:
        check_tensors(found, expected, "init_from=x", "config.json", "tensors", "safetensors weights")
    assert str(e.value) == ("init_from=x: the safetensors weights do not match config.json: missing tensors "
                            "h.0.ln_1.weight; unexpected tensors h.9.mlp.c_fc.weight; shapes disagree: wte.weight "
                            "(6, 4) but config.json implies (8, 4)")
    many = {f"h.{i}.ln_1.weight": torch.zeros(4) for i in range(8)}
    with pytest.raises(UserError, match=r"^x: the weights do not match the model config: missing keys h\.0\.ln_1"
                                        r"\.weight, .*h\.4\.ln_1\.weight and 3 more$"):
        check_tensors({}, many, "x")
    check_tensors(expected, expected, "x")  # nothing to say


def test_bad_inputs_name_init_from(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "llama").mkdir()  # a model type llmtrain reads, without its sizes
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    data = (tmp_path / "plain.pt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    cases = {
        str(tmp_path / "missing.ckpt"): "no such file or directory",
        str(tmp_path / "notes.txt"): "cannot be read: it is truncated, corrupt or not a checkpoint",
        str(tmp_path / "cut.ckpt"): "cannot be read: it is truncated, corrupt or not a checkpoint",
        str(tmp_path / "empty"): "neither config.json nor checkpoints/last.ckpt",
        str(tmp_path / "bert"): "model_type='bert', but only gpt2, llama, mistral, qwen2, qwen3 map onto",
        str(tmp_path / "llama"): "config.json lacks or mis-sets a size (KeyError('vocab_size'))",
        str(tmp_path / "plain.pt"): "not an llmtrain checkpoint",
    }
    for init_from, what in cases.items():
        for read in (load_pretrained, describe):
            with pytest.raises(UserError) as e:
                read(init_from)
            msg = str(e.value)
            assert msg.startswith(f"init_from={init_from}") and what in msg and "\n" not in msg, msg


def test_resolve_ckpt_path(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("auto", run) is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="no last.ckpt in .*hydra.run.dir"):
        resolve_ckpt_path("last", run)
    torch.manual_seed(0)
    fake_checkpoint(run / "checkpoints" / "last.ckpt", GPT(GPTConfig(**TINY)))
    last = str(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", run) == resolve_ckpt_path(str(run), tmp_path) == resolve_ckpt_path(last, run)
    with pytest.raises(UserError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), run)


def test_newest_loadable_prefers_last_and_passes_over_a_cut_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    for age, name in enumerate(("best-step10.ckpt", "best-step20.ckpt", "last.ckpt")):
        fake_checkpoint(tmp_path / name, model)
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))  # written in this order
    assert newest_loadable_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    assert newest_loadable_checkpoint(tmp_path) == str(tmp_path / "best-step20.ckpt")
    assert f"warning: skipping {tmp_path / 'last.ckpt'}: it does not load" in capsys.readouterr().err


def test_newest_loadable_prefers_last_over_a_newer_best_file(tmp_path):
    """A best-* file written after last.ckpt (it may fall inside an accumulation window) still loses to last."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    for age, name in enumerate(("last.ckpt", "best-step30.ckpt")):
        fake_checkpoint(tmp_path / name, model)
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))  # best-step30 is one second newer
    assert newest_loadable_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


def test_a_checkpoint_without_llmtrains_record_is_refused_in_one_line(tmp_path):
    """Another project's Lightning checkpoint has a state_dict but no `llmtrain` entry to build a model from."""
    torch.manual_seed(0)
    state = {"model." + k: v for k, v in GPT(GPTConfig(**TINY)).state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "other.ckpt")
    for read in (load_pretrained, describe):
        with pytest.raises(UserError, match=r"other\.ckpt is a PyTorch file but not an llmtrain checkpoint \(no "
                                            r"'llmtrain' and 'state_dict' entries\)"):
            read(str(tmp_path / "other.ckpt"))


def test_label_names_without_num_classes_make_a_classifier(tmp_path):
    """A record that lists the classes but not their number (an older run's) still rebuilds the classifier head."""
    torch.manual_seed(0)
    original = GPT(GPTConfig(**TINY))
    original.replace_head(2)
    fake_checkpoint(tmp_path / "c.ckpt", original.eval(), label_names=["neg", "pos"])
    model, info = load_checkpoint(tmp_path / "c.ckpt", "init_from=c.ckpt")
    assert (info.num_classes, info.label_names) == (2, ["neg", "pos"])
    assert read_info(tmp_path / "c.ckpt", "init_from=c.ckpt").num_classes == 2
    assert model.head.out_features == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids(97)), original(ids(97)), atol=0, rtol=0)


def test_auto_and_a_checkpoints_folder_find_the_runs_last_ckpt(tmp_path):
    """ckpt_path=auto (a restarted job) looks in the run's checkpoints/; a checkpoints/ folder itself names its
    last.ckpt, as the run dir does."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    fake_checkpoint(run / "checkpoints" / "last.ckpt", GPT(GPTConfig(**TINY)))
    last = str(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("auto", run) == last
    assert resolve_ckpt_path(str(run / "checkpoints"), tmp_path) == last
