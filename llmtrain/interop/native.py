"""Export folders in llmtrain's own format, which runs wrote to `<run>/model` before the Hugging Face export:
read for init_from, generate and `python -m llmtrain.export` (which turns them into Hugging Face folders).

    model/
      config.json        {"format": "llmtrain", "model_config": {GPTConfig's fields}, "num_classes": null or N,
                          "tokenizer", "task", "label_names", "prompt_template", "stage", "step", ...}
      model.safetensors  the GPT's own state dict (a tied embedding/head stored once, under either name)

A classifier of that time has a head with a bias; it is folded into the final LayerNorm on loading
(checkpoints.fold_head_bias). Plain PyTorch and safetensors: no Lightning or Hydra, no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, fold_head_bias, load_state
from llmtrain.model.gpt import GPT

FORMAT = "llmtrain"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def is_export(path: str | Path) -> bool:
    """Whether path is a folder with such an export's config.json (the weights are not looked at)."""
    try:
        config = json.loads((Path(path).expanduser() / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def read_export_info(path: str | Path) -> ModelInfo:
    """An export folder's ModelInfo, from its config.json alone; problems are a UserError naming the path."""
    path = Path(path).expanduser()
    return ModelInfo.from_meta("llmtrain", path, _read_config(path), str(path / CONFIG))


def load_export(path: str | Path) -> tuple[GPT, ModelInfo]:
    """An export folder -> (GPT in eval mode on the CPU, its ModelInfo)."""
    path = Path(path).expanduser()
    info = read_export_info(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path}: no {WEIGHTS} next to {CONFIG}: copy the whole export folder")
    try:
        state = load_file(weights, device="cpu")
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{weights} is not a readable safetensors file ({first})") from e
    model = GPT(info.model_config)
    if info.num_classes:  # a classifier: the head that GPT.replace_head made
        model.replace_head(info.num_classes)
    if model.tied:  # stored once, under either name
        tied = state.get("head.weight", state.get("tok_emb.weight"))
        if tied is not None:
            state |= {"head.weight": tied, "tok_emb.weight": tied}
    load_state(model, fold_head_bias(state, str(weights)), f"{weights} (with {CONFIG})")
    return model.eval(), info


def _read_config(path: Path) -> dict:
    file = path / CONFIG
    if not file.is_file():
        raise UserError(f"{path} is not an llmtrain export (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not readable JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"{file} has format={found!r}, not {FORMAT!r}: it is not an llmtrain export of the "
                        "earlier format; a Hugging Face GPT-2 folder loads through init_from= as it is")
    return config
