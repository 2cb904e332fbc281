"""Hugging Face GPT-2 in and out. In: parity with a tiny random transformers GPT-2, sharded and bare layouts, bad
folders. Out: transformers loads the export offline and computes our logits, generates our tokens and predicts our
classes; llmtrain reads it back exactly; it is written whole or not at all."""

from __future__ import annotations

import copy
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import llmtrain.interop.folders as folders
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError
from llmtrain.interop.gpt2 import GPT2_NAMES, hub_name
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.model.losses import last_token_logits

TINY_HF = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)


def save_hf(path, sharded: bool = False, **overrides):
    """A random tiny GPT2LMHeadModel saved in save_pretrained layout; returns it in eval mode."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**(TINY_HF | overrides))).eval()
    with torch.no_grad():  # transformers starts LayerNorms at ones and zeros: make them count (and tell them apart)
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
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


def test_what_older_transformers_saved_beside_the_weights_is_passed_over(tmp_path):
    """Older transformers saved the causal-mask buffers (attn.bias, attn.masked_bias) and a tied lm_head.weight
    (the same values as wte): the folder loads, and computes what transformers does."""
    from safetensors.torch import load_file, save_file

    hf = save_hf(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    for i in range(TINY_HF["n_layer"]):
        tensors[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_pretrained(str(tmp_path))
    assert model.tied
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, words", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
    (dict(add_cross_attention=True), "add_cross_attention=true"),
    (dict(scale_attn_weights=False), "scale_attn_weights=false"),
    (dict(activation_function="relu"), "activation_function='relu' (ours is GELU, tanh approximation)"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06 (ours is 1e-5)"),
    (dict(n_inner=100), "n_inner=100 (ours is 4 * n_embd)"),
], ids=["inverse-layer-idx", "cross-attention", "unscaled", "relu", "eps", "n-inner"])
def test_gpt2_options_our_gpt_does_not_compute_are_refused(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY_HF, **change}))
    with pytest.raises(UserError) as e:
        describe(str(tmp_path))
    assert str(e.value) == (f"init_from={tmp_path}: config.json sets {words}, which llmtrain's GPT does not "
                            "implement")


def test_the_gpt2_options_that_compute_the_same_are_accepted(tmp_path):
    same = dict(activation_function="gelu_pytorch_tanh", n_inner=4 * TINY_HF["n_embd"], layer_norm_epsilon=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY_HF, **same}))
    assert describe(str(tmp_path)).model_config.emb_dim == TINY_HF["n_embd"]


def test_hub_names_with_and_without_the_organisation():
    """The Hub moved GPT-2 under openai-community/; both spellings name the same release, nothing else does."""
    assert [hub_name(n) for n in ("gpt2", "openai-community/gpt2", "openai-community/gpt2-xl")] == [
        "gpt2", "gpt2", "gpt2-xl"]
    assert [hub_name(n) for n in ("gpt2-tiny", "someone/gpt2", "openai-community/gpt3")] == [None, None, None]


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


# --- out ---------------------------------------------------------------------------------------------------------


TINY = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)
META = {"tokenizer": "bytes", "stage": "pretrain", "label_names": None, "prompt_template": None,
        "init_from": None, "step": 30}
FILES = ["config.json", "generation_config.json", "llmtrain.json", "merges.txt", "model.safetensors",
         "tokenizer_config.json", "vocab.json"]


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(TINY | overrides))).eval()
    with torch.no_grad():  # GPT-2's init gives near-uniform logits; spread them so that greedy choices are clear
        model.head.weight.mul_(10) if not model.tied else model.tok_emb.weight.mul_(10)
    return model


def classifier(seed: int = 0, n: int = 3) -> GPT:
    model = tiny(seed, tie_weights=True)
    model.replace_head(n)
    with torch.no_grad():
        model.head.weight.normal_()  # a trained head's classes differ clearly
    return model


def tokens(vocab: int = 257, n: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Identical state dicts (keys, shapes, values) and identical logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(tokens()), b(tokens()))


@pytest.mark.parametrize("qkv_bias, tied", [(True, True), (False, True), (True, False), (False, False)])
def test_transformers_computes_our_logits_and_the_round_trip_is_exact(tmp_path, qkv_bias, tied):
    model = tiny(qkv_bias=qkv_bias, tie_weights=tied, drop_rate=0.1)
    out = export_hf(model, tmp_path / "hf", META)
    assert sorted(p.name for p in out.iterdir()) == FILES
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, model(tokens()), atol=1e-4, rtol=0)

    loaded, info = load_pretrained(str(out))  # init_from= and generate's ckpt_path= read it so
    assert loaded.config == model.config and not loaded.training  # qkv_bias and drop_rate come back too
    assert_same(model, loaded)
    assert describe(str(out)) == info
    assert (info.kind, info.tokenizer, info.stage, info.step, info.num_classes) == (
        "hf", "bytes", "pretrain", 30, None)


def test_greedy_generation_gives_the_same_tokens(tmp_path):
    model = tiny()
    out = export_hf(model, tmp_path / "hf", META)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([build_tokenizer("bytes").encode_ordinary("Once upon a time")])
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    ours = model.generate(prompt, 16, temperature=0, eos_id=256)
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[0, prompt.size(1):].tolist())) > 1  # not one token repeated: the comparison means something


def test_a_pipeline_on_the_folder_continues_text_as_our_generate_does(tmp_path):
    """Tokenizer files, model and generation config together, as a user of transformers meets them."""
    from llmtrain.generate import generate_text

    model = tiny(vocab_size=50304, tie_weights=True)  # the GPT-2 tokenizer, a vocabulary padded to 64
    out = export_hf(model, tmp_path / "hf", META | {"tokenizer": "gpt2"})
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    assert pipe.tokenizer("The devil is")["input_ids"] == build_tokenizer("gpt2").encode("The devil is")
    theirs = pipe("The devil is", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert theirs == generate_text(model, build_tokenizer("gpt2"), "The devil is", max_new_tokens=8, temperature=0)


def test_config_json_and_llmtrain_json(tmp_path):
    model = tiny(qkv_bias=False, tie_weights=True, drop_rate=0.1)
    meta = META | {"stage": "instruct", "prompt_template": "alpaca", "init_from": "gpt2", "model_config": {"x": 1}}
    out = export_hf(model, tmp_path / "hf", meta)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"]) == (
        32, 2, 2, 32, 257)
    assert config["tie_word_embeddings"] and config["resid_pdrop"] == config["attn_pdrop"] == 0.1
    assert config["bos_token_id"] == config["eos_token_id"] == 256 and "pad_token_id" not in config
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 256, "eos_token_id": 256}
    record = json.loads((out / "llmtrain.json").read_text())  # the model decides model_config, not the meta
    assert record == {"format": "llmtrain", **{k: v for k, v in meta.items() if k != "model_config"},
                      "model_config": asdict(model.config), "num_classes": None}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it
        names = set(f.keys())
        assert "lm_head.weight" not in names and "transformer.wte.weight" in names  # tied: stored once
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [32, 96]  # Conv1D: (in, out)
        assert not f.get_tensor("transformer.h.1.attn.c_attn.bias").any()  # no qkv bias: zeros in its place
    assert load_pretrained(str(out))[1].prompt_template == "alpaca"


def test_a_classifier_predicts_the_same_classes_in_transformers(tmp_path):
    model = classifier(n=3)
    labels = ["ham", "spam", "eggs"]
    out = export_hf(model, tmp_path / "hf", META | {"num_classes": 3, "stage": "classify", "label_names": labels})
    assert "generation_config.json" not in {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.id2label == dict(enumerate(labels))
    texts = ["free prize, call now", "see you at 6", "a", "the longest message of all"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(texts, padding=True, return_tensors="pt")  # right-padded with <|endoftext|>, as our batches are
    ours_tok = build_tokenizer("bytes")
    ids = [ours_tok.encode_ordinary(t) for t in texts]
    assert batch["input_ids"].tolist() == [s + [256] * (max(map(len, ids)) - len(s)) for s in ids]
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = last_token_logits(model(batch["input_ids"]), torch.tensor([len(s) for s in ids]))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist() and len(set(ours.argmax(-1).tolist())) > 1

    loaded, info = load_pretrained(str(out))
    assert_same(model, loaded)
    assert (info.label_names, info.num_classes, info.stage) == (labels, 3, "classify")


def test_a_classifier_saved_by_transformers_reads_as_one(tmp_path):
    torch.manual_seed(0)
    labels = [f"class {i}" for i in range(12)]  # "10" sorts before "2" as text: the ids are numbers
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=257,
                                     id2label=dict(enumerate(labels)), pad_token_id=256)
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "clf")
    model, info = load_pretrained(str(tmp_path / "clf"))
    assert (info.label_names, info.num_classes) == (labels, 12)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, -1], hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_a_lora_model_exports_merged_and_stays_wrapped(tmp_path, task):
    from llmtrain.interop.lora import apply_lora

    base = classifier() if task == "classify" else tiny(tie_weights=True)
    wrapped = apply_lora(copy.deepcopy(base), r=4, dropout=0.0,
                         modules_to_save=["head"] if task == "classify" else None).eval()
    with torch.no_grad():  # B starts at zero and the saved head as a copy: make both differ from the base
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    labels = ["a", "b", "c"] if task == "classify" else None
    meta = META | {"num_classes": 3 if labels else None, "label_names": labels}
    loaded, _ = load_pretrained(str(export_hf(wrapped, tmp_path / "hf", meta)))
    with torch.no_grad():
        expected = wrapped(tokens())
        torch.testing.assert_close(loaded(tokens()), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base(tokens()), expected, atol=1e-3)  # the adapters did change the output
    after = wrapped.state_dict()  # the wrapped model keeps its adapters and values
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_second_export_replaces_the_first_and_a_crash_keeps_it(tmp_path, monkeypatch):
    first, second = tiny(seed=0), tiny(seed=1, n_layers=1)
    out = export_hf(first, tmp_path / "hf", META | {"step": 10})
    (out / "notes.txt").write_text("the user's")
    (tmp_path / ".hf.llmtrain-tmp-killed").mkdir()  # what killed exports leave behind: of a new folder,
    (out / ".llmtrain-tmp-killed").mkdir()  # and of an existing one
    export_hf(second, out, META | {"step": 20})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "notes.txt"])
    loaded, info = load_pretrained(str(out))
    assert_same(second, loaded)
    assert info.step == 20

    def dies_half_way(tensors, filename, **kwargs):  # a crash while the weights are being written
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(folders, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_hf(first, out, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the older export, untouched
    assert_same(second, load_pretrained(str(out))[0])


def test_an_export_writes_its_own_files_and_leaves_the_rest_of_its_folder(tmp_path):
    """A cloned Hub repository a user pushes to: .git/ and README.md stay through the first export and the next."""
    repo = tmp_path / "repo"
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "README.md").write_text("my model card")
    (repo / "checkpoints").mkdir()
    (repo / "checkpoints" / "last.ckpt").write_text("precious")
    export_hf(tiny(), repo, META)
    second = tiny()
    with torch.no_grad():
        second.head.weight.add_(1.0)
    export_hf(second, repo, META)
    assert (repo / "README.md").read_text() == "my model card" and (repo / ".git" / "HEAD").is_file()
    assert (repo / "checkpoints" / "last.ckpt").read_text() == "precious"
    assert not [p for p in repo.iterdir() if p.name.startswith(".llmtrain-tmp-")]
    assert_same(second, load_pretrained(str(repo))[0])


def test_an_export_never_replaces_files_it_did_not_write_or_another_kind_of_export_unless_told(tmp_path):
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "theirs")  # someone else's Hugging Face folder
    before = {p.name: p.read_bytes() for p in (tmp_path / "theirs").iterdir()}
    with pytest.raises(UserError, match=r"theirs holds config.json, generation_config.json, model.safetensors that "
                                        r"llmtrain did not write: write into another folder, or pass overwrite=true"):
        export_hf(tiny(), tmp_path / "theirs", META)
    assert {p.name: p.read_bytes() for p in (tmp_path / "theirs").iterdir()} == before
    assert_same(tiny(), load_pretrained(str(export_hf(tiny(), tmp_path / "theirs", META, overwrite=True)))[0])
    out = export_hf(tiny(), tmp_path / "hf", META)
    with pytest.raises(UserError, match=r"hf holds an export of GPT2LMHeadModel, stage pretrain; this one is "
                                        r"GPT2LMHeadModel, stage instruct: write into another folder, or pass "
                                        r"overwrite=true"):
        export_hf(tiny(), out, META | {"stage": "instruct"})
    assert json.loads((out / "llmtrain.json").read_text())["stage"] == "pretrain"
    export_hf(tiny(), out, META | {"stage": "instruct"}, overwrite=True)
    assert json.loads((out / "llmtrain.json").read_text())["stage"] == "instruct"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file exists and is not a folder"):
        export_hf(tiny(), tmp_path / "file", META)


def test_an_export_is_readable_by_everyone_the_umask_lets_read(tmp_path):
    old = os.umask(0o022)
    try:
        out = export_hf(tiny(), tmp_path / "hf", META)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644


def _other_shape(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"n_layer": 3}))


def _nonzero_qkv_bias(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.bias"] += 1  # e.g. fine-tuned in transformers and saved over it
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, words", [
    (_other_shape, "llmtrain.json and config.json disagree (n_layers 2 vs 3): restore the files"),
    (_nonzero_qkv_bias, "h.0.attn.c_attn.bias is not zero, but llmtrain.json says qkv_bias=false: delete"),
], ids=["disagree", "qkv-bias"])
def test_a_tampered_export_is_a_one_line_error(tmp_path, damage, words):
    out = export_hf(tiny(qkv_bias=False), tmp_path / "hf", META)
    damage(out)
    with pytest.raises(UserError) as e:
        load_pretrained(str(out))
    assert str(e.value).startswith(f"init_from={out}: ") and words in str(e.value) and "\n" not in str(e.value)
    if damage is _nonzero_qkv_bias:
        (out / "llmtrain.json").unlink()  # the fix the message names: the folder reads as plain GPT-2
        assert load_pretrained(str(out))[0].config.qkv_bias


def test_generate_reads_the_export_refuses_a_classifier_and_wraps_instruct_prompts(tmp_path, monkeypatch):
    import llmtrain.generate as gen
    from llmtrain.data.prompts import format_prompt

    model = tiny()
    out = export_hf(model, tmp_path / "run" / "hf", META)
    args = gen.parse_args([f"ckpt_path={tmp_path / 'run'}", "prompt=Hello", "max_new_tokens=5", "temperature=0",
                           "device=cpu"])  # a run dir that holds only its export
    assert gen.run(args) == gen.generate_text(model, build_tokenizer("bytes"), "Hello", 5, temperature=0)
    assert gen.load_model(str(out))[1].path == str(out)

    export_hf(classifier(n=2), tmp_path / "clf", META | {"num_classes": 2, "label_names": ["neg", "pos"]})
    with pytest.raises(UserError, match=r"is a classifier \(labels: neg, pos\): it predicts labels, it does not"):
        gen.load_model(str(tmp_path / "clf"))

    out = export_hf(model, tmp_path / "instruct", META | {"stage": "instruct", "prompt_template": "alpaca"})
    seen = []
    monkeypatch.setattr(gen, "generate_text", lambda model, tok, prompt, *a, **k: seen.append(prompt) or "ok")
    assert gen.run(gen.parse_args([f"ckpt_path={out}", "prompt=Name a colour", "device=cpu"])) == "ok"
    assert seen == [format_prompt("Name a colour")]


@pytest.mark.parametrize("option, words", [(dict(head_dim=8), "model.head_dim=8"),
                                           (dict(qk_norm=True), "model.qk_norm=True")])
def test_gpt2_options_with_a_head_width_or_qk_norm_have_no_hugging_face_layout(tmp_path, option, words):
    """GPT2LMHeadModel computes neither a head width of its own nor QK-norm: such a model is not written as one."""
    model = GPT(GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=2, n_layers=1, **option))
    with pytest.raises(UserError, match=rf"^the model has no Hugging Face layout: {words} is neither GPT-2's"):
        export_hf(model, tmp_path / "hf", META)
    assert not (tmp_path / "hf").exists()
