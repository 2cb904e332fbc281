"""A LoRA adapter in transformers' naming: peft puts it on GPT2LMHeadModel (or GPT2ForSequenceClassification), or on
the Llama-shaped family's class (Llama, Qwen2, Qwen3), loaded from the base's Hugging Face export, and the result
computes our logits, adapted and merged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file

from llmtrain.errors import UserError
from llmtrain.interop.adapters import export_hf_adapter, is_hf_adapter, llama_module_names
from llmtrain.interop.gpt2 import gpt2_module_name
from llmtrain.interop.hf import export_hf
from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
META = {"tokenizer": "bytes"}


def base_model(tied: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, tie_weights=tied)).eval()


def adapted(model: GPT, targets: list[str], modules_to_save: list[str] | None = None):
    """A peft model whose adapters (and saved head) differ visibly from the base, as after training."""
    peft_model = apply_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.0, target_modules=targets,
                            modules_to_save=modules_to_save).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    return peft_model


def tokens() -> torch.Tensor:
    return torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True")  # lm_head is a Linear in GPT-2, not a Conv1D
@pytest.mark.parametrize("tied, targets", [
    (True, ["attn.qkv", "attn.out_proj"]),  # the lora stage's default
    (False, ["attn.qkv", "attn.out_proj", "mlp.fc1", "fc2", "head"]),  # every linear; a bare name; the LM head
], ids=["default-targets", "every-linear"])
def test_peft_on_transformers_gpt2_computes_our_logits(tmp_path, tied, targets):
    base = base_model(tied)
    base_dir = export_hf(base, tmp_path / "base", META)
    ours = adapted(base, targets)
    out = export_hf_adapter(ours, tmp_path / "hf_adapter", str(base_dir), False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(gpt2_module_name(t) for t in targets)
    assert set(config["target_modules"]) <= {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"}
    assert config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM" and config["auto_mapping"] is None
    assert config["base_model_name_or_path"] == str(base_dir)
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight" in keys
    assert all(k.startswith(("base_model.model.transformer.h.", "base_model.model.lm_head.")) for k in keys)

    with torch.no_grad():
        want = ours(tokens())
        assert not torch.allclose(want, base(tokens()), atol=1e-3)  # the adapter changes the output
        hf = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir), out).eval()
        torch.testing.assert_close(hf(tokens()).logits, want, atol=1e-4, rtol=0)
        merged = hf.merge_and_unload()  # fan_in_fan_out: the update is transposed into Conv1D's (in, out)
        torch.testing.assert_close(merged(tokens()).logits, want, atol=1e-4, rtol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # the base found by base_model_name_or_path
        torch.testing.assert_close(auto(tokens()).logits, want, atol=1e-4, rtol=0)


def test_a_classifier_adapter_with_its_head_on_gpt2_for_sequence_classification(tmp_path):
    base = base_model(tied=True)
    base_dir = export_hf(base, tmp_path / "base", META)
    classifier = copy.deepcopy(base)
    classifier.replace_head(3)
    ours = adapted(classifier, ["attn.qkv", "attn.out_proj"], modules_to_save=["head"])
    out = export_hf_adapter(ours, tmp_path / "hf_adapter", str(base_dir), True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in load_file(out / "adapter_model.safetensors")

    hf_base = transformers.GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=3, pad_token_id=256)
    hf = PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        want = ours(tokens())[:, -1]
        torch.testing.assert_close(hf(tokens()).logits, want, atol=1e-4, rtol=0)


LLAMA_SHAPED = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48, n_heads=4, n_kv_heads=2,
                    qkv_bias=False, bias=False, rope_theta=500.0)
FAMILIES = {  # our options of each family's class, and LoRA targets to put on it
    "LlamaForCausalLM": (dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                         ["attn.qkv", "attn.out_proj"]),
    "Qwen2ForCausalLM": (dict(qkv_bias=True), ["attn.qkv", "attn.out_proj", "mlp.gate", "fc1", "mlp.fc2", "head"]),
    "Qwen3ForCausalLM": (dict(qk_norm=True, head_dim=12), ["qkv", "out_proj", "gate", "fc1", "fc2"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_on_each_llama_shaped_class_computes_our_logits(tmp_path, family):
    """The adapter of a model with a family's options, on that class loaded from the base's export: our attn.qkv's
    adapter is q_proj's, k_proj's and v_proj's (A shared, B split), the others one for one, at the same rank."""
    options, targets = FAMILIES[family]
    torch.manual_seed(0)
    base = GPT(GPTConfig(**(TINY | LLAMA_SHAPED | options), tie_weights="head" not in targets)).eval()
    with torch.no_grad():  # norm gains at 1 and biases at 0 at init: make them count
        for p in base.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    base_dir = export_hf(base, tmp_path / "base", META)
    ours = adapted(base, targets)
    out = export_hf_adapter(ours, tmp_path / "hf_adapter", str(base_dir), False)
    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"attn.qkv": ["q_proj", "k_proj", "v_proj"], "qkv": ["q_proj", "k_proj", "v_proj"],
                "attn.out_proj": ["o_proj"], "out_proj": ["o_proj"], "mlp.gate": ["gate_proj"], "gate": ["gate_proj"],
                "fc1": ["up_proj"], "mlp.fc2": ["down_proj"], "fc2": ["down_proj"], "head": ["lm_head"]}
    assert config["target_modules"] == sorted(hf for t in targets for hf in expected[t])
    assert not config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert {f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_{m}.weight" for p in "qkvo" for m in "AB"} <= keys

    with torch.no_grad():
        want = ours(tokens())
        assert not torch.allclose(want, base(tokens()), atol=1e-3)  # the adapter changes the output
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        assert type(hf_base).__name__ == family
        hf = PeftModel.from_pretrained(hf_base, out).eval()
        torch.testing.assert_close(hf(tokens()).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf.merge_and_unload()(tokens()).logits, want, atol=1e-4, rtol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # the base found by base_model_name_or_path
        torch.testing.assert_close(auto(tokens()).logits, want, atol=1e-4, rtol=0)


def test_names_in_the_llama_shaped_classes_terms():
    assert llama_module_names("blocks.3.attn.qkv") == [f"model.layers.3.self_attn.{p}_proj" for p in "qkv"]
    assert [llama_module_names(n) for n in ("blocks.0.mlp.fc1", "attn.out_proj", "qkv", "mlp.gate", "fc2", "head")] == [
        ["model.layers.0.mlp.up_proj"], ["o_proj"], ["q_proj", "k_proj", "v_proj"], ["gate_proj"], ["down_proj"],
        ["lm_head"]]


def test_names_in_gpt2s_terms():
    assert gpt2_module_name("blocks.3.attn.qkv") == "transformer.h.3.attn.c_attn"
    assert [gpt2_module_name(n) for n in ("attn.out_proj", "out_proj", "mlp.fc2", "fc2", "fc1", "ln1")] == [
        "attn.c_proj", "attn.c_proj", "mlp.c_proj", "mlp.c_proj", "mlp.c_fc", "ln_1"]
    assert (gpt2_module_name("head"), gpt2_module_name("head", classifier=True)) == ("lm_head", "score")


def test_an_adapter_is_written_beside_the_files_of_its_folder_and_never_over_anothers(tmp_path):
    ours = adapted(base_model(tied=True), ["attn.qkv"])
    (tmp_path / "hf_adapter").mkdir()
    (tmp_path / "hf_adapter" / "notes.txt").write_text("mine")
    export_hf_adapter(ours, tmp_path / "hf_adapter", None, False)
    assert sorted(p.name for p in (tmp_path / "hf_adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (tmp_path / "hf_adapter" / "notes.txt").read_text() == "mine"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "adapter_model.safetensors").write_text("someone else's weights")
    with pytest.raises(UserError, match="theirs holds adapter_model.safetensors that llmtrain's LoRA export did not "
                                        "write: write into another folder, or pass overwrite=true"):
        export_hf_adapter(ours, tmp_path / "theirs", None, False)
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["adapter_model.safetensors"]


def test_generate_tells_an_adapter_for_transformers_from_ours(tmp_path):
    from llmtrain.generate import load_model
    from llmtrain.interop.lora import save_adapter

    ours = adapted(base_model(tied=True), ["attn.qkv"])
    hf = export_hf_adapter(ours, tmp_path / "hf_adapter", None, False)
    assert is_hf_adapter(hf) and not is_hf_adapter(save_adapter(ours, tmp_path / "adapter"))
    with pytest.raises(UserError, match=r"^ckpt_path=\S+hf_adapter is a LoRA adapter for a transformers class "
                                        r"\(its layers have that class's names\): give the run's adapter/"):
        load_model(str(hf))
