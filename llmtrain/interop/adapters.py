"""LoRA adapters for transformers' own classes: the adapter of a peft model around our GPT, under the names peft gives
the modules of the class the base exports as (GPT-2's, or a Llama-shaped family's), so that
`PeftModel.from_pretrained(<that class>.from_pretrained(<base>), out)` computes what the peft model does
(`export_hf_adapter`), and telling such an adapter from one under our own names (`is_hf_adapter`), which lora.py's
save_adapter writes.

    hf_adapter/
      adapter_config.json        target_modules in the class's names, task_type, base_model_name_or_path;
                                 GPT-2: attn.c_attn, ... with fan_in_fan_out (its Conv1D stores (in, out));
                                 Llama, Qwen2, Qwen3: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
      adapter_model.safetensors  base_model.model.transformer.h.N.attn.c_attn.lora_A.weight, ... (GPT-2),
                                 base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ... (Llama-shaped);
                                 a GPT-2 classifier's head, saved whole, as base_model.model.score.weight

Our one attn.qkv is three projections in the Llama-shaped classes: its adapter's A (rank x width) reads the same input
for all three, so each of q_proj, k_proj and v_proj gets that A and its own rows of B; the update B A is the same,
row block by row block, at the same rank and alpha. Written whole or not at all (folders.py). No Lightning or Hydra;
peft only through lora.py's save_adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmtrain.interop.folders import write_folder
from llmtrain.interop.gpt2 import gpt2_mismatches, gpt2_module_name
from llmtrain.interop.llama import LAYER_NAMES, QKV, llama_mismatches
from llmtrain.interop.lora import save_adapter
from llmtrain.model.gpt import GPTConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def hf_adapter_layout(gpt: nn.Module, classifier: bool) -> str | None:
    """The transformers layout an adapter of this GPT is written in: "gpt2", "llama" (the Llama-shaped classes, which
    have no classifier), or None when none computes it."""
    if not gpt2_mismatches(gpt):
        return "gpt2"
    return None if classifier or llama_mismatches(gpt) else "llama"


def export_hf_adapter(peft_model: nn.Module, out_dir: str | Path, base: str | None, classifier: bool) -> Path:
    """Write a LoRA model's adapter for transformers' class of its base: `PeftModel.from_pretrained(<GPT2LMHeadModel,
    GPT2ForSequenceClassification for a classifier, or the Llama-shaped family's class, of the base's weights>,
    out_dir)` computes what the peft model does. `base` (a Hugging Face folder or Hub name) becomes
    base_model_name_or_path."""
    gpt = peft_model.base_model.model
    layout = hf_adapter_layout(gpt, classifier)
    if layout is None:
        raise ValueError("no transformers class computes this model: neither GPT-2's options nor an LM of Llama's")

    def write(tmp: Path) -> None:
        save_adapter(peft_model, tmp)  # peft's own files, under our module names
        renamed = {}
        for key, tensor in load_file(tmp / ADAPTER_WEIGHTS).items():  # base_model.model.blocks.0.attn.qkv.lora_A.weight
            inner = key.removeprefix("base_model.model.")
            module, sep, rest = inner.partition(".lora_")
            rest = "lora_" + rest if sep else inner.rpartition(".")[2]
            module = module if sep else inner.rpartition(".")[0]  # a module saved whole (modules_to_save)
            if layout == "gpt2":
                renamed[f"base_model.model.{gpt2_module_name(module, classifier)}.{rest}"] = tensor
            else:
                renamed |= {f"base_model.model.{name}.{rest}": t for name, t in _llama_parts(module, rest, tensor,
                                                                                             gpt.config)}
        save_file(renamed, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        saved = [gpt2_module_name(m, classifier) for m in config.get("modules_to_save") or []]
        targets = ([gpt2_module_name(t) for t in config["target_modules"]] if layout == "gpt2" else
                   [hf for t in config["target_modules"] for hf in llama_module_names(t)])
        config |= {"target_modules": sorted(targets), "modules_to_save": saved or None,
                   "fan_in_fan_out": layout == "gpt2",  # GPT-2's Conv1D stores (in, out)
                   "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
                   "base_model_name_or_path": base, "auto_mapping": None}  # not llmtrain's GPT class
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card names our class: not this adapter's base

    return write_folder(Path(out_dir), write, lambda p: (p / ADAPTER_CONFIG).is_file(), "llmtrain's LoRA export")


def llama_module_names(name: str) -> list[str]:
    """One of our linear layers' names (or a peft target suffix) in the Llama-shaped classes' naming:
    `blocks.3.attn.qkv` -> `model.layers.3.self_attn.q_proj`, `k_proj`, `v_proj`; `attn.out_proj` or `out_proj`
    -> `o_proj` (a bare name, as peft matches it); `mlp.fc1` -> `up_proj`; `head` -> `lm_head`."""
    if name == "head":
        return ["lm_head"]
    if name.startswith("blocks."):
        _, layer, inner = name.split(".", 2)  # blocks, N, attn.qkv
        return [f"model.layers.{layer}.{hf}" for hf in (QKV if inner == "attn.qkv" else [LAYER_NAMES[inner]])]
    last = name.split(".")[-1]
    hf = QKV if last == "qkv" else [v for k, v in LAYER_NAMES.items() if k.split(".")[-1] == last]
    return [h.split(".")[-1] for h in hf]


def _llama_parts(module: str, rest: str, tensor: torch.Tensor, c: GPTConfig) -> list[tuple[str, torch.Tensor]]:
    """One of our modules' LoRA tensors (`rest`: lora_A.weight or lora_B.weight) under the Llama-shaped names; attn.qkv
    becomes q_proj, k_proj and v_proj, A shared and B split by rows."""
    names = llama_module_names(module)
    if len(names) == 1:
        return [(names[0], tensor)]
    sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    parts = tensor.split(sizes) if rest.startswith("lora_B") else [tensor] * 3
    return [(name, part.clone()) for name, part in zip(names, parts)]  # safetensors stores no shared memory


def is_hf_adapter(path: str | Path) -> bool:
    """Whether path holds an adapter for a transformers class (its task_type set), such as export_hf_adapter writes,
    rather than one for llmtrain's GPT (peft's config of a model without a task)."""
    try:
        return bool(json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("task_type"))
    except (OSError, ValueError, AttributeError):
        return False
