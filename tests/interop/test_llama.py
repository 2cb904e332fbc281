"""Hugging Face's Llama-shaped families in and out: parity with tiny random models of the real classes (Llama with
Llama 3's RoPE scaling, Mistral, Qwen2 with its q/k/v biases, Qwen3 with QK-norm and a head width of its own; GQA,
tied or not, sharded), their tokenizer.json, refusals, the Hub names offline, and export back to the same class."""

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


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # all three bands of a head of 16
# each family as its own class, with what sets it apart
FAMILY_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
FAMILY_OPTIONS = {
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),  # q/k/v biases: always
    "qwen3": ("qwen3", {"head_dim": 24, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}),
}


def save_llama(path, sharded: bool = False, tokenizer: bool = True, model_type: str = "llama", **overrides):
    """A random tiny model of a Llama-shaped family (LlamaForCausalLM by default) in save_pretrained layout (with the
    bytes tokenizer as tokenizer.json)."""
    torch.manual_seed(0)
    name = FAMILY_CLASSES[model_type]
    config = getattr(transformers, f"{name}Config")(**(TINY_LLAMA | overrides))
    hf = getattr(transformers, f"{name}ForCausalLM")(config).eval()
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


def test_sharded_folder_with_biases_and_the_rope_keys_of_transformers_4(tmp_path):
    hf = save_llama(tmp_path, sharded=True, attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = config.pop("rope_parameters")  # as transformers 4.x wrote Llama 3's
    config["rope_theta"] = config["rope_scaling"].pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(str(tmp_path))
    assert model.config.rope_theta == 500.0 and model.config.bias and model.config.qkv_bias
    assert model.config.rope_scaling["type"] == "llama3"
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


@pytest.mark.parametrize("family, tied", [(f, t) for f in FAMILY_OPTIONS for t in (False, True)])
def test_each_family_matches_transformers(tmp_path, family, tied):
    """Logits to 1e-4, the same greedy tokens (cached decoding on both sides), and our cached tokens equal our
    uncached ones, for each family's own class with its options (GQA, 4 query heads sharing 2 key/value heads)."""
    model_type, options = FAMILY_OPTIONS[family]
    hf = save_llama(tmp_path, model_type=model_type, tie_word_embeddings=tied, **options)
    model, info = load_pretrained(str(tmp_path))
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.tie_weights, model.tied) == (4, 2, tied, tied)
    assert (c.qkv_bias, c.bias, c.qk_norm) == (family == "qwen2", False, family == "qwen3")
    assert c.head_dim == (24 if family == "qwen3" else 16) and c.rope_theta == (1e6 if "qwen" in family else 500.0)
    assert c.rope_scaling == {"llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                              "qwen3": {"type": "linear", "factor": 2.0}}.get(family)
    assert_same_as_transformers(model, hf)
    prompt = ids()[:, :6]
    assert torch.equal(model.generate(prompt, 20, temperature=0), model.generate(prompt, 20, temperature=0,
                                                                                 use_cache=False))


@pytest.mark.parametrize("family", FAMILY_OPTIONS)
def test_each_family_exports_its_own_class_which_computes_our_logits(tmp_path, family):
    """A loaded folder exported again: the same class (Mistral's as Llama's, which computes the same), loaded by
    transformers with the same logits and greedy tokens, and by llmtrain with the same config and weights."""
    model_type, options = FAMILY_OPTIONS[family]
    save_llama(tmp_path / "in", model_type=model_type, **options)
    model, info = load_pretrained(str(tmp_path / "in"))
    out = export_llama(model, info.tokenizer, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = {"mistral": "LlamaForCausalLM"}.get(family, f"{FAMILY_CLASSES[model_type]}ForCausalLM")
    assert type(hf).__name__ == expected and json.loads((out / "config.json").read_text())["architectures"] == [
        expected]
    assert_same_as_transformers(model, hf)
    back, _ = load_pretrained(str(out))
    assert back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_bos_and_eos_of_the_tokenizer_configs_are_written_back(tmp_path):
    """Llama 3's tokenizer names <|begin_of_text|> and <|end_of_text|>: the export's config, generation config and
    tokenizer config name them too (a tokenizer without a begin-of-text token: its end-of-text in both)."""
    save_llama(tmp_path / "in")
    (tmp_path / "in" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "a", "eos_token": "<|endoftext|>"}))
    model, info = load_pretrained(str(tmp_path / "in"))
    out = export_llama(model, info.tokenizer, tmp_path / "out")
    a = build_tokenizer("bytes").encode_ordinary("a")[0]
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == a
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": a, "eos_token_id": 256}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token) == ("a", "<|endoftext|>")
    plain = export_llama(model, "bytes", tmp_path / "plain")
    assert json.loads((plain / "generation_config.json").read_text()) == {"bos_token_id": 256, "eos_token_id": 256}


@pytest.mark.parametrize("config, words", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters.rope_type='yarn' (ours is plain RoPE or linear or llama3 scaling)"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type='dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters of rope_type 'llama3' without low_freq_factor, high_freq_factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor=0.5 (ours turns the whole head)"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' (ours is silu)"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias=true (biases on q, k, v and o without the MLP's"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16), "use_sliding_window=True (a sliding window"),
    (dict(model_type="mistral"), "sliding_window=4096 (a sliding window; ours sees the whole context)"),
    (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]),
     "layer_types=['full_attention', 'sliding_attention'] (ours is full_attention in every layer)"),
], ids=["yarn", "dynamic-4x", "llama3-incomplete", "partial-rotary", "activation", "bias", "qwen3-bias",
        "qwen2-sliding", "mistral-default-window", "layer-types"])
def test_options_our_gpt_does_not_compute_are_refused_by_their_key(tmp_path, config, words):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY_LLAMA, **config}))
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


def test_a_model_type_of_another_architecture_is_refused_naming_those_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", **TINY_LLAMA}))
    with pytest.raises(UserError, match=rf"^init_from={tmp_path}: config.json has model_type='phi3', but only gpt2, "
                                        r"llama, mistral, qwen2, qwen3 map onto llmtrain's GPT; init_from accepts "):
        describe(str(tmp_path))


HUB = {"HuggingFaceTB/SmolLM-135M": "smollm_135m", "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm2_360m",
       "meta-llama/Llama-3.2-1B": "llama3_2_1b", "Qwen/Qwen2.5-0.5B": "qwen2_5_0_5b", "Qwen/Qwen3-0.6B": "qwen3_0_6b"}


@pytest.mark.parametrize("name", HUB)
def test_hub_names_offline_are_one_line(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=rf"^init_from={name}: the weights could not be downloaded from the Hugging "
                                        r"Face Hub \(\w+\); a local directory"):
        describe(name)


def test_a_name_llmtrain_does_not_download_is_refused():
    with pytest.raises(UserError, match="no such file or directory, nor a known Hub name"):
        describe("HuggingFaceTB/SmolLM-1T")


@pytest.mark.parametrize("name", HUB)
def test_a_downloaded_model_names_its_preset(monkeypatch, tmp_path, name):
    save_llama(tmp_path)
    monkeypatch.setattr(pretrained, "download", lambda name, what: tmp_path)  # what the Hub would have given
    info = describe(name)
    assert info.extra == {"hub_name": name, "model_name": HUB[name]}


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
    with pytest.raises(UserError, match=r"cannot be written as a LlamaForCausalLM, Qwen2ForCausalLM or "
                                        r"Qwen3ForCausalLM: it has model.pos_emb=learned, model.norm=layernorm, "
                                        r"model.mlp=gelu, model.qkv_bias=False with model.bias=True"):
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
def test_instruct_from_a_llama3_folder_through_the_command_line(tmp_path):
    """init_from=<HF Llama folder> of Llama 3's kind (RoPE scaling, GQA): its architecture and tokenizer.json carry
    through training, the run's export (with the tokenizer copied in), generation from that export, and export back
    to transformers, which computes the trained model's logits."""
    save_llama(tmp_path / "smol", max_position_embeddings=256,  # byte tokens: an Alpaca prompt is ~150 of them
               rope_parameters=LLAMA3_ROPE)
    run_dir = tmp_path / "run"
    shrink = [a for a in TINY if not a.startswith(("model.", "data.tokenizer", "data.max_documents"))]
    result = run_cli(["finetune=instruct", f"init_from={tmp_path / 'smol'}", *shrink, "data.max_length=200",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
                      "finetune.test_generations=1", "finetune.max_new_tokens=4", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    export = run_dir / "hf"  # the run's export: the Llama layout, with its tokenizer and llmtrain.json
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_parameters"] == LLAMA3_ROPE
    record = json.loads((export / "llmtrain.json").read_text())
    assert record["tokenizer"] == "tokenizer.json" and record["model_config"]["n_kv_heads"] == 2
    assert record["model_config"]["rope_scaling"]["type"] == "llama3"
    for copy in (run_dir / "tokenizer.json", export / "tokenizer.json"):
        assert copy.read_text() == (tmp_path / "smol" / "tokenizer.json").read_text()
    out = run_cli(["ckpt_path=" + str(export), "instruction=Define tree.", "max_new_tokens=3", "temperature=0"],
                  cwd=tmp_path, module="llmtrain.generate")
    assert out.returncode == 0, out.stderr[-2000:]
    model, info = load_pretrained(str(export))
    assert info.prompt_template == "alpaca" and info.stage == "instruct"
    assert info.tokenizer == str((export / "tokenizer.json").resolve())
    start, _ = load_pretrained(str(tmp_path / "smol"))
    assert model.config == start.config and not torch.equal(model.head.weight, start.head.weight)  # trained
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


# the published config.json of each preset's model (architecture keys; Hugging Face Hub, 2024-2025)
SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3,
           "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 100000, "rope_scaling": None, "tie_word_embeddings": True}
PUBLISHED = {
    "llama3_2_1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True},
    "qwen2_5_0_5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24,
                     "tie_word_embeddings": True},
    "qwen3_0_6b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
                   "rope_scaling": None, "attention_bias": False, "sliding_window": None,
                   "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": True},
    "smollm2_135m": SMOLLM2,
    "smollm2_360m": SMOLLM2 | {"num_attention_heads": 15, "num_key_value_heads": 5, "hidden_size": 960,
                               "intermediate_size": 2560, "num_hidden_layers": 32},
    "smollm_135m": SMOLLM2 | {"max_position_embeddings": 2048, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_each_preset_is_its_published_config_and_has_transformers_parameter_count(preset):
    """conf/model/<preset>.yaml is what init_from reads from the published config.json, and on the meta device it
    has as many parameters as transformers' own class of that config (tied embeddings counted once)."""
    import yaml
    from conftest import ROOT

    from llmtrain.interop.llama import config_from_llama

    ours = GPTConfig(**yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text()))
    published = PUBLISHED[preset]
    assert ours == config_from_llama(published, preset)
    config = transformers.AutoConfig.for_model(**published)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
        model = GPT(ours)
    assert model.num_params() == sum(p.numel() for p in theirs.parameters()) > 100e6
