"""llmtrain's checkpoint files: where `ckpt_path` points, what a checkpoint says about itself, safe loading.

A Lightning checkpoint written by llmtrain holds, besides Lightning's own entries (`state_dict`, optimizer,
loops), an `llmtrain` entry that describes the model: its config, tokenizer, stage, classes, labels and prompt
template. `read_info` reads that entry into a `ModelInfo` without reading the weights (memory-mapped);
`load_checkpoint` builds the GPT from it. Every load is `weights_only=True`: no pickled objects are run.
No Lightning or Hydra here.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmtrain.data.tokenizer import find_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig

# prefixes that wrappers put in front of the GPT's own keys: the LightningModule, torch.compile, peft
WRAPPER_PREFIXES = ("model.", "_orig_mod.", "base_model.model.")


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint, an export or a Hugging Face folder says about the model it holds (read once)."""

    kind: str  # "llmtrain" (a .ckpt) or "hf" (a Hugging Face folder of a family hf.py reads: exports too)
    path: str  # the file or folder read
    model_config: GPTConfig
    tokenizer: str | None = "gpt2"  # gpt2, bytes or a tokenizer.json's path; None: a Hugging Face folder without one
    stage: str | None = None  # the name of the stage that wrote it (conf/finetune)
    label_names: list[str] | None = None  # a classifier's classes, in head order
    prompt_template: str | None = None  # e.g. "alpaca" for an instruction-tuned model
    num_classes: int | None = None  # a classifier's head size (None: the LM head)
    init_from: str | None = None  # what its own run started from
    init_from_digest: str | None = None  # the content digest of init_from's files then (interop/digest.py)
    step: int | None = None
    extra: dict = field(default_factory=dict)  # e.g. hub_name, model_name for a Hub download
    config: dict | None = None  # the effective config of the run that wrote it (what a resume compares)
    chat_template: str | None = None  # the Jinja source a chat stage trained with (None: not a chat model)

    @classmethod
    def from_meta(cls, kind: str, path: str | Path, meta: dict, what: str) -> ModelInfo:
        """From the `llmtrain` entry of a checkpoint (or an export's llmtrain.json); `what` names it in errors."""
        try:
            config = GPTConfig(**meta["model_config"])
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{what}: the model config it holds is unusable ({e})") from e
        labels = meta.get("label_names")
        folder = Path(path) if Path(path).is_dir() else Path(path).parent  # where a copied tokenizer.json lies
        tokenizer = find_tokenizer(meta.get("tokenizer") or "gpt2", folder)
        return cls(kind=kind, path=str(path), model_config=config, tokenizer=tokenizer,
                   stage=meta.get("stage"), label_names=labels,
                   prompt_template=meta.get("prompt_template"),
                   num_classes=meta.get("num_classes") or (len(labels) if labels else None),
                   init_from=meta.get("init_from"), init_from_digest=meta.get("init_from_digest"),
                   step=meta.get("step"), config=meta.get("config"), chat_template=meta.get("chat_template"))


def safe_load(path: str | Path, what: str, hint: str = "", mmap: bool = False) -> dict:
    """torch.load with weights_only=True; every way a file can fail to be a checkpoint is one UserError.

    `what` names the file as the user gave it (e.g. "ckpt_path=runs/x/last.ckpt"); `hint` ends the message.
    """
    where = what if str(path) in what else f"{what}: {path}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # a pickle opcode the safe loader rejects: not a checkpoint
            raise UserError(f"{where} cannot be read: it is truncated, corrupt or not a checkpoint "
                            f"({type(e).__name__}){hint}") from e
        culprit = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        culprit = culprit.split(" was not")[0].removeprefix("WeightsUnpickler error: ")
        raise UserError(
            f"{where} holds Python objects besides tensors ({culprit}), which safe loading (weights_only=True) "
            "refuses: save a checkpoint of plain dicts and tensors, as llmtrain's own are"
        ) from e
    except Exception as e:  # a text file, a truncated zip, ...: torch raises a variety of types
        raise UserError(f"{where} cannot be read: it is truncated, corrupt or not a checkpoint "
                        f"({type(e).__name__}){hint}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "llmtrain" not in checkpoint:
        raise UserError(f"{where} is a PyTorch file but not an llmtrain checkpoint (no 'llmtrain' and "
                        f"'state_dict' entries){hint}")
    return checkpoint


def read_info(path: str | Path, what: str, hint: str = "") -> ModelInfo:
    """The ModelInfo of an llmtrain .ckpt, memory-mapped so that no weights are read."""
    return ModelInfo.from_meta("llmtrain", path, safe_load(path, what, hint, mmap=True)["llmtrain"], what)


def empty_gpt(config: GPTConfig, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT of config whose weights a loader fills: allocated once in dtype, uninitialised (no random init to
    overwrite, and weights kept in bf16 never pass through a float32 copy of the model)."""
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    model.to_empty(device="cpu")
    if config.tie_weights:  # to_empty gives each module its own tensor: one again
        model.head.weight = model.tok_emb.weight
    return model


def load_checkpoint(path: str | Path, what: str, hint: str = "",
                    dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelInfo]:
    """An llmtrain .ckpt -> (GPT with its weights in dtype, in eval mode on the CPU; its ModelInfo)."""
    checkpoint = safe_load(path, what, hint)
    info = ModelInfo.from_meta("llmtrain", path, checkpoint["llmtrain"], what)
    model = empty_gpt(info.model_config, dtype)
    if info.num_classes:  # a classifier: the head the classify stage made
        model.replace_head(info.num_classes)
    load_state(model, merged_state(strip_prefixes(checkpoint["state_dict"]), info.config, what), what)
    return model.eval(), info


def merged_state(state_dict: dict, config: dict | None, what: str) -> dict:
    """A LoRA run's checkpoint state (names without wrapper prefixes) -> the plain model's, each adapted weight
    W + (B @ A) * alpha / r as peft's merge computes it, and each fully trained copy (modules_to_save, a classifier's
    head) in place of the frozen original. A state without adapters is returned as it is. config: the run's
    effective config (the checkpoint records it), whose finetune.lora gives r and alpha."""
    if not any(".base_layer." in k for k in state_dict):  # peft wraps each adapted layer: base_layer, lora_A, lora_B
        return state_dict
    lora = ((config or {}).get("finetune") or {}).get("lora") or {}
    if not lora.get("r") or lora.get("alpha") is None:
        raise UserError(f"{what}: the checkpoint holds LoRA adapters but records no finetune.lora r and alpha to "
                        f"merge them with: use the run's merged export (<run>/hf) instead")
    scaling = lora["alpha"] / lora["r"]
    out = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        if ".base_layer." in key:
            module, _, param = key.partition(".base_layer.")
            if param == "weight":
                a, b = state_dict[f"{module}.lora_A.default.weight"], state_dict[f"{module}.lora_B.default.weight"]
                value = (value.float() + (b.float() @ a.float()) * scaling).to(value.dtype)
            key = f"{module}.{param}"
        out[key.replace(".modules_to_save.default.", ".")] = value
    return out


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefixes (`model.`, `_orig_mod.`, `base_model.model.`, in any nesting) from every key."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_state(model: GPT, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Copy every tensor of a state dict (our names) into the model, after check_tensors."""
    check_tensors(state_dict, model.state_dict(), what)
    model.load_state_dict(state_dict)


def check_tensors(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
                  against: str = "the model config", entries: str = "keys", weights: str = "weights") -> None:
    """The check before every copy of weights into a GPT (a checkpoint's state dict, a Hugging Face folder's
    safetensors): one UserError, one line, naming what `found` lacks, what it has beyond `expected` and what differs
    in shape, a few of each. `against` names where `expected` comes from (the model config, config.json), `entries`
    what the names are (state-dict keys, file tensors), `weights` what was read."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {tuple(found[k].shape)} but {against} implies {tuple(t.shape)}" for k, t in expected.items()
             if k in found and found[k].shape != t.shape]
    problems = []
    if missing:
        problems.append(f"missing {entries} {few(missing)}")
    if unexpected:
        hint = " (LoRA weights: merge them into the base first)" if any("lora_" in k for k in unexpected) else ""
        problems.append(f"unexpected {entries} {few(unexpected)}{hint}")
    if wrong:
        problems.append(f"shapes disagree: {few(wrong)}")
    if problems:
        raise UserError(f"{what}: the {weights} do not match {against}: {'; '.join(problems)}")


def few(items: list[str], n: int = 5) -> str:
    """The first n items, and how many more there are."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --- resuming ---------------------------------------------------------------------------------------------------


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """A .ckpt file as given; a run or checkpoints folder -> its last.ckpt; "last" -> run_dir's last.ckpt;
    "auto" -> the newest checkpoint of run_dir that loads, else a fresh start (for jobs a scheduler restarts)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        return newest_loadable_checkpoint(run_dir / "checkpoints")
    path = run_dir if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        hint = " (pass the earlier run's hydra.run.dir=... so that 'last' finds it)" if ckpt_path == "last" else ""
        raise UserError(f"ckpt_path={ckpt_path!r}: no last.ckpt in {path}{hint}")
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path!r} does not exist: give a .ckpt file or a run dir")
    return str(path)


def newest_loadable_checkpoint(folder: Path) -> str | None:
    """last.ckpt if it opens as a checkpoint, else the newest other .ckpt that does (a file cut short: passed over).

    last.ckpt comes first: it is always saved right after an optimizer step, while a best-by-val/loss file may
    fall inside a gradient-accumulation window.
    """
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated or corrupt: say so and take the next one
            print(f"warning: skipping {path}: it does not load ({type(e).__name__})", file=sys.stderr)
            continue
        return str(path)
    return None
