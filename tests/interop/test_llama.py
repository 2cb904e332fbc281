"""Hugging Face Llama in and out: parity with a tiny random transformers LlamaForCausalLM (GQA, tied or not,
sharded), its tokenizer.json, refusals, the Hub name offline, and export back to LlamaForCausalLM."""

import json

import pytest
import torch
from conftest import TINY, run_cli
from safetensors.torch import load_file

import llmtrain.interop.pretrained as pretrained
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.errors import UserError
from llmtrain.generate import generate_text
from llmtrain.interop.llama import export_llama, llama_mismatches
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the bytes tokenizer's, so that a tokenizer.json can come with the folder
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def save_llama(path, sharded: bool = False, tokenizer: bool = True, **overrides):
    """A random tiny LlamaForCausalLM in save_pretrained layout (with the bytes tokenizer as tokenizer.json)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_LLAMA | overrides))).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make them count
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape) * 0.1)
    hf.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "50KB"} if sharded else {}))
    if tokenizer:
        (path / "tokenizer.json").write_text(tokenizer_json("bytes"))
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return hf


def ids(n: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


def assert_same_as_transformers(model: GPT, hf) -> None:
    """Logits to 1e-4 and the same greedy continuation (cached decoding on both sides)."""
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)
    prompt = x[:1, :8]
    ours = model.generate(prompt, 12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_directory_matches_transformers(tmp_path, tied):
    hf = save_llama(tmp_path, tie_word_embeddings=tied)
    model, info = load_pretrained(str(tmp_path))
    assert info.kind == "hf" and describe(str(tmp_path)) == info and not model.training
    c = model.config
    assert (c.pos_emb, c.norm, c.mlp, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.bias, c.qkv_bias) == (
        "rope", "rmsnorm", "swiglu", 4, 2, 96, False, False)
    assert (c.rope_theta, c.norm_eps, c.context_length, c.tie_weights) == (500.0, 1e-5, 64, tied)
    assert model.tied == tied
    assert_same_as_transformers(model, hf)
    assert info.tokenizer == str((tmp_path / "tokenizer.json").resolve())
    tok = build_tokenizer(info.tokenizer)
    assert tok.eot_token == 256
    # the folder's tokenizer drives generation: the text is what transformers' greedy tokens decode to
    prompt = "Hello"
    expected = hf.generate(torch.tensor([tok.encode_ordinary(prompt)]), max_new_tokens=6, do_sample=False,
                           min_new_tokens=6, pad_token_id=0)[0, 5:].tolist()
    expected = expected[: expected.index(256)] if 256 in expected else expected
    assert generate_text(model, tok, prompt, max_new_tokens=6, temperature=0) == tok.decode(expected)


def test_sharded_folder_with_biases_and_the_rope_theta_of_transformers_4(tmp_path):
    hf = save_llama(tmp_path, sharded=True, attention_bias=True, mlp_bias=True)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # as transformers 4.x wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(str(tmp_path))
    assert model.config.rope_theta == 500.0 and model.config.bias and model.config.qkv_bias
    assert model.blocks[0].attn.qkv.bias is not None and model.blocks[0].mlp.gate.bias is not None
    assert_same_as_transformers(model, hf)


def test_bare_llama_model_without_head_loads_with_a_tied_head(tmp_path):
    hf = save_llama(tmp_path / "lm", tie_word_embeddings=True)
    hf.model.save_pretrained(tmp_path / "bare", safe_serialization=True)  # keys without "model.", no lm_head
    model, info = load_pretrained(str(tmp_path / "bare"))
    assert info.tokenizer is None  # no tokenizer.json there
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), hf(ids()).logits, atol=1e-4, rtol=0)


def test_rope_frequencies_saved_by_older_transformers_are_passed_over(tmp_path):
    from safetensors.torch import save_file

    hf = save_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer, not a weight
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), hf(ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, words", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}), "RoPE scaling 'llama3'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' (ours is silu)"),
    (dict(head_dim=32), "head_dim=32 (ours is hidden_size / num_attention_heads = 16)"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
], ids=["rope-scaling", "activation", "head-dim", "bias"])
def test_llama_options_our_gpt_does_not_compute_are_refused(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY_LLAMA, **change}))
    with pytest.raises(UserError) as e:
        describe(str(tmp_path))
    assert str(e.value).startswith(f"init_from={tmp_path}: config.json sets ") and words in str(e.value)
    assert "which llmtrain's GPT does not implement" in str(e.value)


def test_a_config_json_of_sizes_alone_takes_transformers_defaults(tmp_path):
    """The keys a config.json may leave out mean what LlamaConfig's defaults say: one kv head per head, rms_norm_eps
    1e-6, RoPE theta 10000, 2048 positions, an untied head, no biases."""
    sizes = {k: TINY_LLAMA[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads")}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **sizes}))
    c = describe(str(tmp_path)).model_config
    assert (c.n_heads, c.n_kv_heads, c.norm_eps, c.rope_theta, c.context_length, c.tie_weights, c.bias) == (
        4, 4, 1e-6, 10000.0, 2048, False, False)
    theirs = transformers.LlamaConfig(**sizes)
    assert (theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.max_position_embeddings,
            theirs.tie_word_embeddings) == (c.n_kv_heads, c.norm_eps, c.context_length, c.tie_weights)


def test_weights_that_disagree_with_config_json_are_named_as_transformers_names_them(tmp_path):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 4, "num_hidden_layers": 1}))
    with pytest.raises(UserError) as e:
        load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"init_from={tmp_path}: the safetensors weights do not match config.json: ")
    assert "unexpected tensors model.layers.1." in msg
    assert "model.layers.0.self_attn.k_proj.weight (32, 64) but config.json implies (64, 64)" in msg


def test_smollm_hub_name_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"^init_from=HuggingFaceTB/SmolLM-135M: the weights could not be downloaded "
                                        r"from the Hugging Face Hub \(\w+\); a local directory"):
        describe("HuggingFaceTB/SmolLM-135M")
    with pytest.raises(UserError, match="no such file or directory, nor a known Hub name"):
        describe("HuggingFaceTB/SmolLM-1T")  # not a name llmtrain downloads


def test_a_downloaded_smollm_names_its_preset(monkeypatch, tmp_path):
    save_llama(tmp_path)
    monkeypatch.setattr(pretrained, "download", lambda name, what: tmp_path)  # what the Hub would have given
    info = describe("HuggingFaceTB/SmolLM-135M")
    assert info.extra == {"hub_name": "HuggingFaceTB/SmolLM-135M", "model_name": "smollm_135m"}


def llama_gpt(tied: bool = True, bias: bool = False) -> GPT:
    torch.manual_seed(3)
    config = GPTConfig(vocab_size=VOCAB, context_length=48, emb_dim=48, n_heads=6, n_kv_heads=2, n_layers=2,
                       pos_emb="rope", rope_theta=1000.0, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                       mlp_hidden=80, bias=bias, qkv_bias=bias, tie_weights=tied)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm gains at 1 and biases at 0 at init: make them count
                p.add_(torch.randn(p.shape) * 0.1)
    return model


@pytest.mark.parametrize("tied, bias", [(True, False), (False, True)])
def test_export_loads_in_transformers_and_back_through_init_from(tmp_path, tied, bias):
    model = llama_gpt(tied, bias)
    out = export_llama(model, "bytes", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    assert_same_as_transformers(model, hf)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = build_tokenizer("bytes")
    assert tok("naïve café", add_special_tokens=False)["input_ids"] == ours.encode_ordinary("naïve café")
    assert tok.eos_token_id == ours.eot_token == hf.config.eos_token_id
    back, info = load_pretrained(str(out))  # and in again: the very same weights
    assert back.config == model.config and info.tokenizer == str((out / "tokenizer.json").resolve())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_export_of_a_loaded_llama_reproduces_its_files(tmp_path):
    save_llama(tmp_path / "in")
    model, info = load_pretrained(str(tmp_path / "in"))
    export_llama(model, info.tokenizer, tmp_path / "out")
    original = load_file(tmp_path / "in" / "model.safetensors")
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "in" / "tokenizer.json").read_text()


def test_export_refuses_models_llama_cannot_express_and_folders_it_did_not_write(tmp_path):
    gpt2 = GPT(GPTConfig(vocab_size=VOCAB, context_length=16, emb_dim=32, n_heads=2, n_layers=1))
    assert llama_mismatches(llama_gpt()) == [] and len(llama_mismatches(gpt2)) == 4  # what the wiring asks
    with pytest.raises(UserError, match=r"cannot be written as a LlamaForCausalLM: it has model.pos_emb=learned, "
                                        r"model.norm=layernorm, model.mlp=gelu, model.qkv_bias=False with "
                                        r"model.bias=True"):
        export_llama(gpt2, "bytes", tmp_path / "hf")
    classifier = llama_gpt()
    classifier.replace_head(3)
    with pytest.raises(UserError, match="it has a classification head"):
        export_llama(classifier, "bytes", tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_text("precious")
    (tmp_path / "run" / "config.json").write_text("{}")  # not written by llmtrain: refused, as for GPT-2
    with pytest.raises(UserError, match="run holds config.json that llmtrain did not write"):
        export_llama(llama_gpt(), "bytes", tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "last.ckpt"]
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_instruct_from_a_llama_folder_through_the_command_line(tmp_path):
    """init_from=<HF Llama folder>: its architecture and tokenizer.json carry through training, the run's export
    (with the tokenizer copied in), generation from that export, and export back to transformers."""
    save_llama(tmp_path / "smol", max_position_embeddings=256)  # byte tokens: an Alpaca prompt is ~150 of them
    run_dir = tmp_path / "run"
    shrink = [a for a in TINY if not a.startswith(("model.", "data.tokenizer", "data.max_documents"))]
    result = run_cli(["finetune=instruct", f"init_from={tmp_path / 'smol'}", *shrink, "data.max_length=200",
                      "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
                      "finetune.test_generations=1", "finetune.max_new_tokens=4", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    export = run_dir / "hf"  # the run's export: the Llama layout, with its tokenizer and llmtrain.json
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    record = json.loads((export / "llmtrain.json").read_text())
    assert record["tokenizer"] == "tokenizer.json" and record["model_config"]["n_kv_heads"] == 2
    for copy in (run_dir / "tokenizer.json", export / "tokenizer.json"):
        assert copy.read_text() == (tmp_path / "smol" / "tokenizer.json").read_text()
    out = run_cli(["ckpt_path=" + str(export), "instruction=Define tree.", "max_new_tokens=3", "temperature=0"],
                  cwd=tmp_path, module="llmtrain.generate")
    assert out.returncode == 0, out.stderr[-2000:]
    model, info = load_pretrained(str(export))
    assert info.prompt_template == "alpaca" and info.stage == "instruct"
    assert info.tokenizer == str((export / "tokenizer.json").resolve())
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), hf(ids()).logits, atol=1e-4, rtol=0)


def test_a_lora_model_is_exported_merged(tmp_path):
    """lora=default on a Llama-option model: its adapters (q/k/v, o and the gated MLP) are merged into the export."""
    from llmtrain.interop.lora import apply_lora

    wrapped = apply_lora(llama_gpt(), r=4, dropout=0.0,
                         target_modules=["attn.qkv", "attn.out_proj", "mlp.gate", "mlp.fc1", "mlp.fc2"]).eval()
    with torch.no_grad():  # B starts at zero: give the adapters an effect
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_llama(wrapped, "bytes", tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, wrapped(ids()), atol=1e-4, rtol=0)
        assert not torch.allclose(hf(ids()).logits, llama_gpt()(ids()), atol=1e-2)


def test_a_config_without_tie_word_embeddings_is_untied_and_keeps_its_head(tmp_path):
    """transformers' Llama is untied unless config.json says otherwise: a folder whose config.json leaves the key out
    and holds an lm_head.weight loads that head, not the embedding in its place."""
    hf = save_llama(tmp_path / "lm", tie_word_embeddings=False)
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    model, _ = load_pretrained(str(tmp_path / "lm"))
    assert not model.tied and torch.equal(model.head.weight, hf.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), hf(ids()).logits, atol=1e-4, rtol=0)
