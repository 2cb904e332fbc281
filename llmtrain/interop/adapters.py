"""LoRA adapters for transformers' GPT-2: the adapter of a peft model around our GPT, under the names peft gives
transformers' GPT-2 modules, so that `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(<base>), out)`
computes what the peft model does (`export_hf_adapter`), and telling such an adapter from one under our own names
(`is_hf_adapter`), which lora.py's save_adapter writes.

    hf_adapter/
      adapter_config.json        target_modules in GPT-2's names (attn.c_attn, ...), fan_in_fan_out (GPT-2's
                                 Conv1D stores (in, out)), task_type, base_model_name_or_path
      adapter_model.safetensors  base_model.model.transformer.h.N.attn.c_attn.lora_A.weight, ...; a classifier's
                                 head, saved whole, as base_model.model.score.weight

Written whole or not at all (folders.py). No Lightning or Hydra; peft only through lora.py's save_adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from llmtrain.interop.folders import write_folder
from llmtrain.interop.gpt2 import gpt2_module_name
from llmtrain.interop.lora import save_adapter

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_hf_adapter(peft_model: nn.Module, out_dir: str | Path, base: str | None, classifier: bool) -> Path:
    """Write a LoRA model's adapter for transformers' GPT-2: `PeftModel.from_pretrained(<GPT2LMHeadModel, or
    GPT2ForSequenceClassification for a classifier, of the base's weights>, out_dir)` computes what the peft model
    does. `base` (a Hugging Face folder or Hub name) becomes base_model_name_or_path."""

    def write(tmp: Path) -> None:
        save_adapter(peft_model, tmp)  # peft's own files, under our module names
        renamed = {}
        for key, tensor in load_file(tmp / ADAPTER_WEIGHTS).items():  # base_model.model.blocks.0.attn.qkv.lora_A.weight
            inner = key.removeprefix("base_model.model.")
            module, sep, rest = inner.partition(".lora_")
            rest = "lora_" + rest if sep else inner.rpartition(".")[2]
            module = module if sep else inner.rpartition(".")[0]  # a module saved whole (modules_to_save)
            renamed[f"base_model.model.{gpt2_module_name(module, classifier)}.{rest}"] = tensor
        save_file(renamed, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        saved = [gpt2_module_name(m, classifier) for m in config.get("modules_to_save") or []]
        config |= {"target_modules": sorted(gpt2_module_name(t) for t in config["target_modules"]),
                   "modules_to_save": saved or None, "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
                   "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
                   "base_model_name_or_path": base, "auto_mapping": None}  # not llmtrain's GPT class
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card names our class: not this adapter's base

    return write_folder(Path(out_dir), write, lambda p: (p / ADAPTER_CONFIG).is_file(), "llmtrain's LoRA export")


def is_hf_adapter(path: str | Path) -> bool:
    """Whether path holds an adapter for transformers' GPT-2 (fan_in_fan_out: its layers are Conv1D), such as
    export_hf_adapter writes, rather than one for llmtrain's GPT."""
    try:
        return bool(json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("fan_in_fan_out"))
    except (OSError, ValueError, AttributeError):
        return False
