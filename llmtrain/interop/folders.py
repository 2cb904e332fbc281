"""Hugging Face folders on disk, whatever the architecture family: what gpt2.py and llama.py (and adapters.py) share.

In: config.json and llmtrain.json (JSON, read with one-line errors), the weights as `model.safetensors` or as the
shards that `model.safetensors.index.json` names, a Hub repository's snapshot. Out: a folder written whole or not
at all (an export, an adapter), and an export's `llmtrain.json`: what only llmtrain reads, the exact GPTConfig and
the run's record (tokenizer, stage, classes, prompt template, init_from, step), so that reading the folder back
gives the very model that was exported.

A new folder is written beside its destination and renamed into place; into an existing one, llmtrain writes its
own files and leaves the rest (a `.git/`, a README). Either way a kill or a full disk in the middle of a write
leaves the previous files as they were, and a reader never sees a half-written file. No Lightning or Hydra, and no
transformers: safetensors and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

from llmtrain.data.tokenizer import TOKENIZER_FILE, is_file_tokenizer
from llmtrain.errors import UserError
from llmtrain.files import saving, umask
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.model.gpt import GPT

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION = "generation_config.json"
LLMTRAIN_JSON = "llmtrain.json"  # beside llmtrain's Hugging Face export: what only llmtrain reads
FORMAT = "llmtrain"  # llmtrain.json's "format"
RESERVED = ("format", "model_config", "num_classes", "tokenizer")  # llmtrain.json keys the export decides, not meta


# --- in ---------------------------------------------------------------------------------------------------------


def download(repo_id: str, what: str) -> Path:
    """The local snapshot of a Hub repository's config, tokenizer and safetensors weights."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG, "*.safetensors", "*.json"]))
    except Exception as e:  # offline, no huggingface_hub, a proxy, ...
        raise UserError(
            f"{what}: the weights could not be downloaded from the Hugging Face Hub ({type(e).__name__}); "
            "a local directory in save_pretrained layout (config.json + model.safetensors) also works"
        ) from e


def read_json(file: Path, what: str):
    """A JSON file's value; an unreadable one is a UserError naming it."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {file} is not readable JSON ({e}): restore it, or write the folder again "
                        "(save_pretrained, or python -m llmtrain.export)") from e


def read_config_json(path: Path, what: str) -> dict:
    """A Hugging Face folder's config.json as a dict ({} if it holds no JSON object)."""
    config = read_json(path / CONFIG, what)
    return config if isinstance(config, dict) else {}


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json names, on the CPU."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX, what)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{what}: {path / INDEX} has no \"weight_map\" of tensor names to shard files: write "
                            f"it again (save_pretrained), or remove it to read {WEIGHTS} alone")
        shards = sorted(set(weight_map.values()))
    elif (path / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise UserError(f"{what}: no {WEIGHTS} (or {INDEX}) next to {CONFIG} (found: {found}); save with "
                        "save_pretrained(dir, safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"{what}: the shard {shard} named in {INDEX} is missing")
        try:
            tensors |= load_file(path / shard, device="cpu")
        except Exception as e:  # safetensors' SafetensorError: truncated, or not safetensors at all
            raise UserError(f"{what}: {path / shard} cannot be read: it is truncated or not safetensors "
                            f"({type(e).__name__}: {e}); write it again (save_pretrained, or llmtrain's export)") from e
    return tensors


def read_labels(hf: dict, what: str) -> list[str]:
    """A classifier's class names from config.json's id2label ({"0": "ham", "1": "spam"}), in class order; without
    one, num_labels of LABEL_i."""
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    keys = [str(k) for k in id2label] if isinstance(id2label, dict) else []
    if not keys or set(keys) != {str(i) for i in range(len(keys))}:
        shown = ", ".join(repr(k) for k in keys[:4]) or repr(id2label)
        raise UserError(f"{what}: {CONFIG}'s id2label has keys {shown}, not the class numbers 0 to "
                        f"{max(len(keys), 2) - 1}: key it by class number, e.g. \"id2label\": "
                        f"{{\"0\": \"ham\", \"1\": \"spam\"}}")
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def read_record(info: ModelInfo, path: Path, what: str, stated: Iterable[str], family: str) -> ModelInfo:
    """info (what config.json says), or beside llmtrain's own export what its llmtrain.json says: the exact
    GPTConfig (e.g. drop_rate, which config.json does not state) and the run's record. The GPTConfig fields that
    config.json also states (`stated`) and the classes must agree; `family` names the plain reading of the folder."""
    file = path / LLMTRAIN_JSON
    if not file.is_file():
        return info
    ours = ModelInfo.from_meta("hf", path, read_json(file, what), f"{what}: {LLMTRAIN_JSON}")
    differ = [f"{k} {getattr(ours.model_config, k)} vs {getattr(info.model_config, k)}" for k in stated
              if getattr(ours.model_config, k) != getattr(info.model_config, k)]
    if ours.num_classes != info.num_classes:
        differ.append(f"classes {ours.num_classes} vs {info.num_classes}")
    if differ:
        raise UserError(f"{what}: {LLMTRAIN_JSON} and {CONFIG} disagree ({', '.join(differ)}): restore the files "
                        f"that were exported together, or delete {LLMTRAIN_JSON} to read the folder as plain {family}")
    return ours


def is_hf_export(path: str | Path) -> bool:
    """Whether path holds an llmtrain Hugging Face export (its llmtrain.json)."""
    try:
        record = json.loads((Path(path) / LLMTRAIN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


# --- out --------------------------------------------------------------------------------------------------------


def stop_ids(meta: dict, eot: int) -> int | list[int]:
    """generation_config's eos_token_id: a chat model stops at its end-of-turn token (as llmtrain's chat does) and
    at the end of text."""
    turn = meta.get("end_of_turn")
    return eot if turn is None or turn == eot else [turn, eot]


def record_text(gpt: GPT, meta: dict, tokenizer: str, num_classes: int | None) -> str:
    """llmtrain.json's text: the run's record (`meta`: stage, label_names, prompt_template, init_from, step, ...),
    the tokenizer (a tokenizer.json as the copy in the folder, found wherever the folder goes), the model's exact
    GPTConfig and its classes."""
    record = {"format": FORMAT, **{k: v for k, v in meta.items() if k not in RESERVED},
              "tokenizer": TOKENIZER_FILE if is_file_tokenizer(tokenizer) else tokenizer,
              "model_config": dataclasses.asdict(gpt.config), "num_classes": num_classes}
    return json.dumps(record, indent=1) + "\n"


def write_export(out: Path, tensors: dict[str, torch.Tensor], texts: dict[str, str], overwrite: bool = False) -> Path:
    """Write model.safetensors (tensors, on the CPU) and the text files (file name -> text) into the folder out
    (write_folder). An earlier llmtrain export there is updated when it is of the same architecture and stage;
    another one, or files of the same names that llmtrain did not write, only with overwrite. Returns out."""

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})  # transformers requires the "format" entry
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_folder(out, write, is_hf_export, "llmtrain", overwrite, identity=export_identity)


def export_identity(folder: Path) -> str:
    """What an export is, as a refusal names it: its class (config.json's architectures) and its stage."""
    def value(name: str, key: str):
        try:
            return json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    architectures = value(CONFIG, "architectures") or ["?"]
    return f"{', '.join(architectures)}, stage {value(LLMTRAIN_JSON, 'stage')}"


def write_folder(out: Path, write: Callable[[Path], None], owned: Callable[[Path], bool], writer: str,
                 overwrite: bool = False, identity: Callable[[Path], object] | None = None) -> Path:
    """Write the files that write(tmp) makes into the folder out, and leave everything else in out as it was (a
    cloned Hub repository's .git/ and README.md stay, as with transformers' save_pretrained). Returns out.

    A new folder is written beside out and renamed into place: whole or not at all. Into an existing folder the
    files are written to a hidden folder inside it first, synced, and then each renamed over its namesake (the
    record llmtrain.json last), so a kill or a full disk while writing leaves the previous files as they were.
    Refused in one line unless overwrite: files of the same names in a folder that `owned` (an earlier write by
    `writer`, e.g. llmtrain) does not recognise, or an earlier write whose `identity` (architecture, stage) differs.
    Files of an earlier write that this one does not have (shards of a sharded export) are removed. A full disk is
    one line naming the folder."""
    with saving(out):
        return _write_folder(out, write, owned, writer, overwrite, identity)


def _write_folder(out: Path, write: Callable[[Path], None], owned: Callable[[Path], bool], writer: str,
                  overwrite: bool, identity: Callable[[Path], object] | None) -> Path:
    mask = umask()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: give out_dir a folder")
    fresh = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}{_TMP}*"), *(out.glob(f"{_TMP}*") if not fresh else [])]:
        shutil.rmtree(stale, ignore_errors=True)  # left behind by a writer that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}" if fresh else _TMP, dir=out.parent if fresh else out))
    try:
        write(tmp)
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: (n == LLMTRAIN_JSON, n))
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o666 & ~mask)  # safetensors writes 0600: files as the user's umask says
        if fresh:
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would keep a teammate out of the export
            os.replace(tmp, out)
            return out
        earlier = owned(out)
        taken = sorted(n for n in names if (out / n).exists())
        if taken and not earlier and not overwrite:
            raise UserError(f"{out} holds {', '.join(taken[:4])} that {writer} did not write: write into another "
                            f"folder, or pass overwrite=true to replace them (other files are always left as they are)")
        if earlier and identity is not None and identity(out) != identity(tmp) and not overwrite:
            raise UserError(f"{out} holds an export of {identity(out)}; this one is {identity(tmp)}: write into "
                            f"another folder, or pass overwrite=true to replace it")
        previous = {p.name for p in out.iterdir() if _of_a_write(p.name)} if earlier else set()
        for name in names:
            os.replace(tmp / name, out / name)
        for name in previous - set(names):
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_TMP = ".llmtrain-tmp-"  # a write in progress


def _of_a_write(name: str) -> bool:
    """Files that an earlier export or adapter wrote and a new one replaces (and removes when it has none)."""
    return name in (CONFIG, WEIGHTS, INDEX, GENERATION, LLMTRAIN_JSON) or (
        name.startswith("model-") and name.endswith(".safetensors"))
