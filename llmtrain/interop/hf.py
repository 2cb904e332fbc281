"""Hugging Face in and out, by architecture family: which family's layout a model is written in, which family's
reader a folder (or a Hub name) goes to. The families themselves are gpt2.py (GPT-2) and llama.py (the Llama-shaped
ones: Llama, Mistral, Qwen2, Qwen3), each both ways; what their folders share is folders.py.

Out: `export_hf` writes a language model with Llama's options (rope, rmsnorm, swiglu) as the Llama-shaped family
that computes it (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), any other model of GPT-2's options (and
every classifier) as GPT2LMHeadModel or GPT2ForSequenceClassification.
In: `read_hf_info` and `load_hf` read a folder by its config.json's model_type. No Lightning or Hydra.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.folders import read_config_json
from llmtrain.interop.gpt2 import GPT2_NAMES, export_gpt2, gpt2_mismatches, hub_name, load_gpt2, read_gpt2_info
from llmtrain.interop.llama import (
    FAMILIES,
    LLAMA_OPTIONS,
    export_family,
    export_llama,
    llama_mismatches,
    load_llama,
    read_llama_info,
)
from llmtrain.interop.lora import plain_gpt
from llmtrain.model.gpt import GPT

# config.json's model_type -> (read its ModelInfo, load its model)
READERS = {"gpt2": (read_gpt2_info, load_gpt2)} | {t: (read_llama_info, load_llama) for t in FAMILIES}
# Hub names of Llama-shaped models accepted by name (downloaded), base and instruction-tuned, with the conf/model
# preset of the same shapes (GPT-2's: gpt2.GPT2_NAMES)
LLAMA_NAMES = {name: preset for preset, names in {
    "smollm_135m": ("HuggingFaceTB/SmolLM-135M", "HuggingFaceTB/SmolLM-135M-Instruct"),
    "smollm2_135m": ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "smollm2_360m": ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    "llama3_2_1b": ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2_5_0_5b": ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen3_0_6b": ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B"),
}.items() for name in names}
HUB_NAMES = [*GPT2_NAMES, *LLAMA_NAMES]  # the Hub names llmtrain downloads


def export_hf(model: nn.Module, out_dir: str | Path, meta: dict, overwrite: bool = False) -> Path:
    """Write model (a GPT, or a peft model around one, merged into a copy: the model is not modified) to out_dir
    in its family's Hugging Face layout, with llmtrain.json beside.

    overwrite: replace an earlier export of another architecture or stage, or files llmtrain did not write, in
    out_dir (other files there are always left as they are).
    meta is the run's record (tokenizer, stage, num_classes, label_names, prompt_template, init_from, step): it goes
    to llmtrain.json, and decides the tokenizer files and, with num_classes, the classifier layout (GPT-2's only).
    Returns out_dir."""
    gpt = plain_gpt(model)
    if meta.get("num_classes") is None and not llama_mismatches(gpt):
        return export_llama(gpt, meta.get("tokenizer") or "gpt2", out_dir, meta, overwrite)
    differ = gpt2_mismatches(gpt)
    if differ:
        raise UserError(f"the model has no Hugging Face layout: {', '.join(differ)} is neither GPT-2's nor (with "
                        f"{', '.join(f'{k}={v}' for k, v in LLAMA_OPTIONS.items())}) Llama's; llmtrain reads its "
                        f"checkpoints (init_from=, generate's ckpt_path=)")
    return export_gpt2(gpt, out_dir, meta, overwrite)


def layout_name(gpt: GPT, classifier: bool = False) -> str:
    """The family export_hf writes the GPT as: GPT-2, Llama, Qwen2 or Qwen3."""
    if classifier or llama_mismatches(gpt):
        return "GPT-2"
    return FAMILIES[export_family(gpt.config)].architecture.removesuffix("ForCausalLM")


def read_hf_info(path: Path, what: str, hint: str = "") -> ModelInfo:
    """What a Hugging Face folder says about its model (config.json, llmtrain.json), without its weights."""
    return _family(path, what, hint)[0](path, what)


def load_hf(path: Path, what: str, hint: str = "", dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelInfo]:
    """A Hugging Face folder -> (GPT with its weights in dtype, in eval mode on the CPU; ModelInfo)."""
    return _family(path, what, hint)[1](path, what, dtype)


def hub_preset(name: str) -> str | None:
    """The conf/model preset with the shapes of a Hub name that llmtrain downloads; None for any other name."""
    return GPT2_NAMES[hub_name(name)] if hub_name(name) else LLAMA_NAMES.get(name)


def _family(path: Path, what: str, hint: str) -> tuple:
    """The reader and loader of a Hugging Face folder, by its config.json's model_type."""
    model_type = read_config_json(path, what).get("model_type")
    if model_type not in READERS:
        raise UserError(f"{what}: config.json has model_type={model_type!r}, but only {', '.join(READERS)} map "
                        f"onto llmtrain's GPT{hint}")
    return READERS[model_type]
