"""Weights to start from: one name (`init_from=`, generate's `ckpt_path=`) for every kind of pretrained model.

Accepted, in this order:
  - a directory with `config.json`: a Hugging Face folder, read by its family (hf.py), llmtrain's own export among
    them (its llmtrain.json makes the round trip exact);
  - a run directory: its `checkpoints/last.ckpt`, else its export `hf/`;
  - an llmtrain `.ckpt` file (checkpoints.py);
  - a Hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `HuggingFaceTB/SmolLM2-135M`,
    `Qwen/Qwen2.5-0.5B`, ...: hf.HUB_NAMES), downloaded.
`describe` reads only what a source says about its model (config, tokenizer, classes), so that the run's config can
be checked against it before any weights are read; `load_pretrained` reads the weights too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, load_checkpoint, read_info
from llmtrain.interop.folders import CONFIG, download
from llmtrain.interop.hf import HUB_NAMES, hub_preset, load_hf, read_hf_info
from llmtrain.model.gpt import GPT

ACCEPTS = ("an llmtrain .ckpt file, a run directory, an llmtrain export directory, a local Hugging Face GPT-2, "
           f"Llama, Mistral, Qwen2 or Qwen3 directory (config.json + model.safetensors) or a Hub name "
           f"({', '.join(HUB_NAMES)})")


def describe(init_from: str, key: str = "init_from") -> ModelInfo:
    """What init_from holds, without its weights (a Hub name is downloaded first)."""
    kind, path = _locate(init_from, key)
    what, hint = f"{key}={init_from}", f"; {key} accepts {ACCEPTS}"
    if kind == "hf":
        return _hub_info(read_hf_info(path, what, hint), init_from)
    return read_info(path, what, hint)


def load_pretrained(init_from: str, key: str = "init_from",
                    dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelInfo]:
    """init_from -> (GPT with its config and weights in dtype, in eval mode on the CPU; its ModelInfo). A run that
    trains in bf16 (precision bf16-true) loads bf16 weights as they are, without a float32 model in between."""
    kind, path = _locate(init_from, key)
    what, hint = f"{key}={init_from}", f"; {key} accepts {ACCEPTS}"
    if kind == "hf":
        model, info = load_hf(path, what, hint, dtype)
        return model, _hub_info(info, init_from)
    return load_checkpoint(path, what, hint, dtype)


def _locate(init_from: str, key: str) -> tuple[str, Path]:
    """("hf" | "ckpt", the folder or file to read) for init_from; a Hub name is downloaded."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        if (path / CONFIG).is_file():
            return "hf", path
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return "ckpt", candidate
        if (path / "hf" / CONFIG).is_file():
            return "hf", path / "hf"
        raise UserError(f"{key}={init_from}: the directory holds neither config.json nor checkpoints/last.ckpt "
                        f"nor hf/config.json; {key} accepts {ACCEPTS}")
    if path.is_file():
        return "ckpt", path
    if hub_preset(init_from):
        return "hf", download(init_from, f"{key}={init_from}")
    raise UserError(f"{key}={init_from}: no such file or directory, nor a known Hub name; {key} accepts {ACCEPTS}")


def _hub_info(info: ModelInfo, init_from: str) -> ModelInfo:
    """A Hub download also says which of our model presets has its shapes."""
    preset = hub_preset(init_from)
    if preset is None:
        return info
    return replace(info, extra={"hub_name": init_from, "model_name": preset})


def hf_folder(init_from: str) -> str | None:
    """Where init_from's weights are in Hugging Face's layout, for an adapter's base_model_name_or_path: a Hub
    name, a Hugging Face folder (absolute), a run dir's export hf/; None when they are only in llmtrain's own files
    (a .ckpt), which `python -m llmtrain.export` turns into such a folder."""
    if hub_preset(init_from):
        return init_from
    path = Path(init_from).expanduser()
    for folder in (path, path / "hf"):
        if (folder / CONFIG).is_file():
            return str(folder.resolve())
    return None
