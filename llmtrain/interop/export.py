"""Hugging Face out: a model as a GPT-2 folder that transformers loads offline, and a LoRA adapter that peft puts
on transformers' GPT-2.

    hf/
      config.json             GPT2Config: GPT2LMHeadModel, or GPT2ForSequenceClassification with id2label
      generation_config.json  <|endoftext|> as bos and eos (language models)
      model.safetensors       transformer.h.N.attn.c_attn.weight, ...: GPT-2's names and Conv1D (in, out)
                              orientation; a tied head is stored once, as transformer.wte.weight
      vocab.json, merges.txt, tokenizer_config.json   the tokenizer (hf_tokenizer.py)
      llmtrain.json           what only llmtrain reads: the exact GPTConfig, tokenizer, stage, classes,
                              prompt template, init_from, step (the record a checkpoint carries)

Our GPT is GPT-2's architecture, so the translation is names and transposes only (the tables in hub.py, read
backwards): a model without a qkv bias gets zeros in its place, and a classifier's head is bias-free like
GPT-2's `score`. hub.py reads the folder back into the very same GPT (init_from=, generate's ckpt_path=). A LoRA
model is exported merged; `export_hf_adapter` writes the adapter alone, under the names peft gives transformers'
GPT-2 modules, with fan_in_fan_out for its Conv1D layers.

Folders are written beside their destination and renamed into place: out_dir is never half-written, and an
existing out_dir is replaced only when it is an export or an adapter (or empty), never a run dir by mistake.
No Lightning or Hydra, and no transformers: only safetensors and JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmtrain.data.tokenizer import TOKENIZER_FILE, build_tokenizer, is_file_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_files
from llmtrain.errors import UserError
from llmtrain.interop.folders import write_folder
from llmtrain.interop.gpt2 import CLASSIFIER, LAYER_NAMES, LLMTRAIN_JSON, TOP_NAMES, TRANSPOSED
from llmtrain.interop.llama import LLAMA_OPTIONS, export_llama, llama_mismatches
from llmtrain.interop.lora import plain_gpt, save_adapter
from llmtrain.model.gpt import GPT

GPT2_OPTIONS = {"pos_emb": "learned", "norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "bias": True}
CONFIG, WEIGHTS, GENERATION = "config.json", "model.safetensors", "generation_config.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
RESERVED = ("format", "model_config", "num_classes")  # llmtrain.json keys that the model decides, not the meta
HF_MODULES = {ours: hf for hf, ours in LAYER_NAMES.items()} | {"head": "lm_head"}  # attn.qkv -> attn.c_attn, ...
HF_LEAVES = {ours.split(".")[-1]: hf for ours, hf in HF_MODULES.items()}  # qkv -> attn.c_attn: a bare name is
# qualified, since GPT-2 has two c_proj (attention and MLP) where we have out_proj and fc2


def export_hf(model: nn.Module, out_dir: str | Path, meta: dict) -> Path:
    """Write model (a GPT, or a peft model around one, merged into a copy) to out_dir in GPT-2's layout.

    meta is the run's record (tokenizer, stage, num_classes, label_names, prompt_template, init_from, step): it goes
    to llmtrain.json, and decides the tokenizer files and, with num_classes, the classifier layout. The model is
    not modified. Returns out_dir.
    """
    gpt = plain_gpt(model)
    classifier = meta.get("num_classes") is not None
    if not classifier and not llama_mismatches(gpt):  # Llama's options: LlamaForCausalLM's layout
        return export_llama(gpt, meta.get("tokenizer") or "gpt2", out_dir, meta)
    differ = gpt2_mismatches(gpt)
    if differ:
        raise UserError(f"the model has no Hugging Face layout: {', '.join(differ)} is neither GPT-2's nor (with "
                        f"{', '.join(f'{k}={v}' for k, v in LLAMA_OPTIONS.items())}) Llama's; llmtrain reads its "
                        f"checkpoints (init_from=, generate's ckpt_path=)")
    labels = _labels(gpt, classifier, meta.get("label_names"))
    tokenizer = meta.get("tokenizer") or "gpt2"
    eot = build_tokenizer(tokenizer).eot_token
    record = {"format": "llmtrain", **{k: v for k, v in meta.items() if k not in RESERVED},
              "model_config": dataclasses.asdict(gpt.config), "num_classes": len(labels) if labels else None}
    if is_file_tokenizer(tokenizer):  # the copy in the folder, found wherever the folder goes
        record["tokenizer"] = TOKENIZER_FILE
    files = {CONFIG: hf_config(gpt, eot, labels), LLMTRAIN_JSON: record}
    if not classifier:
        files[GENERATION] = {"bos_token_id": eot, "eos_token_id": eot}
    texts = {name: json.dumps(value, indent=1) + "\n" for name, value in files.items()}  # fails before any file
    texts |= tokenizer_files(tokenizer, gpt.config.context_length, pad=classifier)
    tensors = hf_state_dict(gpt, classifier)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})  # transformers requires the "format" entry
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_folder(Path(out_dir), write, is_hf_export, "an llmtrain export")


def gpt2_mismatches(gpt: GPT) -> list[str]:
    """What keeps a GPT from GPT-2's layout (empty: export_hf writes it as GPT2LMHeadModel or a classifier)."""
    c = gpt.config
    differ = [f"model.{k}={getattr(c, k)}" for k, v in GPT2_OPTIONS.items() if getattr(c, k) != v]
    if c.n_kv_heads != c.n_heads:
        differ.append(f"model.n_kv_heads={c.n_kv_heads}")
    if c.mlp_hidden != 4 * c.emb_dim:
        differ.append(f"model.mlp_hidden={c.mlp_hidden}")
    return differ


def hf_state_dict(gpt: GPT, classifier: bool = False) -> dict[str, torch.Tensor]:
    """The GPT's weights under GPT-2's names (`transformer.h.0.attn.c_attn.weight`, ...), Conv1D weights as
    (in, out), on the CPU. The head: nothing when tied (transformers ties lm_head to wte), else `lm_head.weight`
    or a classifier's `score.weight`. Zeros stand in for an absent qkv bias (GPT-2 always has one)."""
    top = {ours: hf for hf, ours in TOP_NAMES.items()}
    tied = gpt.tied
    out = {}
    for key, tensor in gpt.state_dict().items():
        if key == "head.weight":
            if not tied:
                out["score.weight" if classifier else "lm_head.weight"] = tensor
            continue
        module, _, leaf = key.rpartition(".")
        name = f"transformer.{top[key]}" if key in top else f"{hf_module_name(module)}.{leaf}"
        out[name] = tensor.t() if name.endswith(TRANSPOSED) else tensor
    if not gpt.config.qkv_bias:
        dtype = gpt.tok_emb.weight.dtype
        out |= {f"transformer.h.{i}.attn.c_attn.bias": torch.zeros(3 * gpt.config.emb_dim, dtype=dtype)
                for i in range(gpt.config.n_layers)}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def hf_module_name(name: str, classifier: bool = False) -> str:
    """One of our module names (or a peft target suffix) in GPT-2's naming: `blocks.3.attn.qkv` ->
    `transformer.h.3.attn.c_attn`, `attn.out_proj` -> `attn.c_proj`, `fc2` -> `mlp.c_proj`, `head` -> `lm_head`
    (a classifier's: `score`)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        return f"transformer.h.{parts[1]}.{hf_module_name('.'.join(parts[2:]))}"
    if name == "head" and classifier:
        return "score"
    return HF_MODULES.get(name) or HF_LEAVES.get(name) or name


def hf_config(gpt: GPT, eot: int, label_names: list[str] | None = None) -> dict:
    """GPT2Config's fields for the GPT; with label_names, those of GPT2ForSequenceClassification (padded with
    <|endoftext|>, as llmtrain's batches are: the classifier reads the last token that is not padding)."""
    c = gpt.config
    config = {
        "architectures": [CLASSIFIER if label_names else "GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_embd": c.emb_dim, "n_head": c.n_heads,
        "n_layer": c.n_layers, "n_inner": None, "activation_function": "gelu_new",  # GELU, tanh approximation
        "resid_pdrop": c.drop_rate, "embd_pdrop": c.drop_rate, "attn_pdrop": c.drop_rate,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": c.tie_weights,
        "torch_dtype": str(gpt.tok_emb.weight.dtype).removeprefix("torch."),
    }
    if label_names:
        config |= {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)},
                   "pad_token_id": eot}
    return config


def export_hf_adapter(peft_model: nn.Module, out_dir: str | Path, base: str | None, classifier: bool) -> Path:
    """Write a LoRA model's adapter for transformers' GPT-2: `PeftModel.from_pretrained(<GPT2LMHeadModel, or
    GPT2ForSequenceClassification for a classifier, of the base's weights>, out_dir)` computes what the peft model
    does. `base` (a Hugging Face folder or Hub name) becomes base_model_name_or_path."""
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        save_adapter(peft_model, tmp)  # peft's own files, under our module names
        tensors = load_file(tmp / ADAPTER_WEIGHTS)
        renamed = {}
        for key, tensor in tensors.items():  # base_model.model.blocks.0.attn.qkv.lora_A.weight, ....head.weight
            inner = key.removeprefix("base_model.model.")
            module, sep, rest = inner.partition(".lora_")
            rest = "lora_" + rest if sep else inner.rpartition(".")[2]
            module = module if sep else inner.rpartition(".")[0]  # a module saved whole (modules_to_save)
            renamed[f"base_model.model.{hf_module_name(module, classifier)}.{rest}"] = tensor
        save_file(renamed, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        saved = [hf_module_name(m, classifier) for m in config.get("modules_to_save") or []]
        config |= {"target_modules": sorted(hf_module_name(t) for t in config["target_modules"]),
                   "modules_to_save": saved or None, "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
                   "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
                   "base_model_name_or_path": base, "auto_mapping": None}  # not llmtrain's GPT class
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card names our class: not this adapter's base

    return write_folder(out, write, lambda p: (p / ADAPTER_CONFIG).is_file(), "a LoRA adapter")


def is_hf_export(path: str | Path) -> bool:
    """Whether path holds an llmtrain Hugging Face export (its llmtrain.json)."""
    try:
        record = json.loads((Path(path) / LLMTRAIN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == "llmtrain"


def is_hf_adapter(path: str | Path) -> bool:
    """Whether path holds an adapter for transformers' GPT-2 (fan_in_fan_out: its layers are Conv1D), such as
    export_hf_adapter writes, rather than one for llmtrain's GPT."""
    try:
        return bool(json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("fan_in_fan_out"))
    except (OSError, ValueError, AttributeError):
        return False


# --- helpers ----------------------------------------------------------------------------------------------------


def _labels(gpt: GPT, classifier: bool, label_names: list[str] | None) -> list[str] | None:
    """A classifier's label names, one per row of its head (HF's LABEL_i where none are known); None for an LM."""
    rows = gpt.head.out_features
    if not classifier:
        if rows != gpt.config.vocab_size:
            raise ValueError(f"the head has {rows} rows, not one per token ({gpt.config.vocab_size}): a classifier "
                             "is exported with meta num_classes")
        return None
    labels = [str(n) for n in label_names] if label_names else [f"LABEL_{i}" for i in range(rows)]
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} label names for a head of {rows} classes")
    return labels

