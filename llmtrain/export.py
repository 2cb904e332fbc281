"""The final model as files that need neither Lightning nor pickle: safetensors weights with their config beside.

An export is a folder:

    out_dir/
      config.json        {"format": "llmtrain", "model_config": {GPTConfig's fields}, "num_classes": null or N,
                          and the caller's meta: tokenizer, task, label_names, prompt_template, stage, step, ...}
      model.safetensors  the plain GPT's state dict, on the CPU, contiguous; a tied embedding/head is stored once
      tokenizer.json     a copy of the run's tokenizer when that is a Hugging Face tokenizer.json (config.json then
                         says "tokenizer": "tokenizer.json", relative to the folder)

"num_classes" is set for a classifier, whose `head` was replaced by `GPT.replace_head`; the loader rebuilds
that head before reading the weights. A LoRA model (peft) is exported with its adapters merged into a copy, so the
folder always holds a plain GPT. `export_model` writes into a temporary sibling folder and renames it into place:
out_dir is never half-written, and a newer export of the same run replaces the older one whole.

`read_export_info` reads config.json alone, `load_export` the model too; `pretrained.load_pretrained` (init_from=,
generate's ckpt_path=) sends such folders here. Plain PyTorch and safetensors: no Lightning or Hydra.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from llmtrain.checkpoints import ModelInfo
from llmtrain.errors import UserError
from llmtrain.lora import merge
from llmtrain.model import GPT
from llmtrain.tokenizer import TOKENIZER_FILE, is_file_tokenizer, tokenizer_path

FORMAT = "llmtrain"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
RESERVED = ("format", "model_config", "num_classes")  # keys that describe the weights: the model decides them


def export_model(model: nn.Module, out_dir: str | Path, meta: dict) -> Path:
    """Write model (a GPT, or a peft-wrapped GPT, merged into a copy) to out_dir as config.json + model.safetensors.

    meta (JSON-serialisable) is stored in config.json beside the model's own keys. The model is not modified.
    An existing out_dir is replaced only if it is an export (or empty). Returns out_dir.
    """
    out = Path(out_dir)
    if out.exists() and not _is_replaceable(out):
        raise UserError(f"{out} exists and is not an llmtrain export (no config.json with \"format\": \"llmtrain\"): "
                        "export into a new folder, or move this one away")
    gpt = plain_gpt(model)
    config = {"format": FORMAT, "model_config": dataclasses.asdict(gpt.config), "num_classes": _num_classes(gpt)}
    config |= {k: v for k, v in meta.items() if k not in RESERVED}
    source = None
    if is_file_tokenizer(config.get("tokenizer")):  # a tokenizer.json travels with the weights, named relative to
        source, config["tokenizer"] = tokenizer_path(config["tokenizer"]), TOKENIZER_FILE  # the folder
    text = json.dumps(config, indent=1) + "\n"  # a meta value JSON cannot hold fails here, before any file exists
    with atomic_folder(out) as tmp:
        save_model(gpt, str(tmp / WEIGHTS), force_contiguous=True)  # safetensors copies each tensor to the CPU
        (tmp / CONFIG).write_text(text)
        if source is not None:
            shutil.copyfile(source, tmp / TOKENIZER_FILE)
    return out


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A new temporary folder beside out to write into; when the block ends, its files are synced and it replaces
    out whole (an older out is removed); when the block fails, it is deleted and out is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            _fsync(file)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in out.parent.iterdir():  # left behind by an export that was killed
        if stale.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            shutil.rmtree(stale, ignore_errors=True)


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
        raise UserError(f"{path}: no {WEIGHTS} next to {CONFIG}: copy the whole export folder, or export again")
    model = GPT(info.model_config)
    if info.num_classes:  # a classifier: the head that GPT.replace_head made
        model.replace_head(info.num_classes)
    _check_weights(model, weights)
    load_model(model, str(weights), strict=True, device="cpu")
    return model.eval(), info


def is_export(path: str | Path) -> bool:
    """Whether path is a folder with an llmtrain export's config.json (the weights are not looked at)."""
    try:
        config = json.loads((Path(path).expanduser() / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


# --- helpers ----------------------------------------------------------------------------------------------------


def plain_gpt(model: nn.Module) -> GPT:
    """The GPT itself, or for a peft model a merged copy (the wrapped model keeps its adapters)."""
    if isinstance(model, GPT):
        return model
    if hasattr(model, "merge_and_unload"):
        merged = merge(copy.deepcopy(model))
        if isinstance(merged, GPT):
            return merged
    raise TypeError(f"export_model takes an llmtrain GPT or a peft model around one, got {type(model).__name__}")


def _num_classes(gpt: GPT) -> int | None:
    """None for the LM head (no bias, a row per token); the row count of a classifier head from replace_head."""
    head = gpt.head
    if head.bias is not None:
        return head.out_features
    if head.out_features != gpt.config.vocab_size:
        raise ValueError(f"the head maps to {head.out_features} outputs without a bias: neither the LM head "
                         f"({gpt.config.vocab_size} tokens) nor a replace_head classifier")
    return None


def _is_replaceable(out: Path) -> bool:
    """An older export (or an empty folder, or one holding only an export's files): never a run dir by mistake."""
    if not out.is_dir():
        return False
    return is_export(out) or {p.name for p in out.iterdir()} <= {CONFIG, WEIGHTS, TOKENIZER_FILE}


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an older out is moved aside first and deleted after (a directory cannot be renamed over)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_config(path: Path) -> dict:
    file = path / CONFIG
    if not file.is_file():
        raise UserError(f"{path} is not an llmtrain export (no {CONFIG}): point at the folder that export_model "
                        f"wrote ({CONFIG} + {WEIGHTS})")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not readable JSON ({e}): export the model again") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"{file} has format={found!r}, not {FORMAT!r}: it was not written by llmtrain's "
                        "export_model; a Hugging Face GPT-2 folder loads through init_from= instead")
    return config


def _check_weights(model: GPT, weights: Path) -> None:
    """Every tensor of the model present once (a tied pair under either name), no others, same shapes: one line."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{weights} is not a readable safetensors file ({first}): export the model again") from e
    names_of: dict[int, list[str]] = {}  # one entry per tensor; a tied embedding/head has two names
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [names[0] for names in names_of.values() if not any(n in shapes for n in names)]
    unexpected = [k for k in shapes if k not in own]
    for names in names_of.values():
        unexpected += [n for n in names if n in shapes][1:]  # a tied pair stored twice: config.json says one tensor
    wrong = [f"{k} {shapes[k]} vs {own[k]}" for k in shapes if k in own and shapes[k] != own[k]]
    problems = [f"{what} {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                for what, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                   ("shapes differ from config.json's:", wrong)) if keys]
    if problems:
        raise UserError(f"{weights}: the weights do not fit {CONFIG}: {'; '.join(problems)}: export the model again "
                        f"(or restore the {CONFIG} written with these weights)")
