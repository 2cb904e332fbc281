"""LoRA adapters for the GPT through peft (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W gets a trainable update (alpha / r) * B @ A with A (r, in) and B (out, r); B starts at zero,
so a freshly wrapped model computes exactly what the base did. Only A and B (and any `modules_to_save`) train.

peft is imported inside the functions: importing it costs ~4 s (it pulls transformers), which runs that never use
LoRA should not pay. The `LoraConfig` is built with `task_type` unset: the task types (CAUSAL_LM, SEQ_CLS, ...)
expect Hugging Face model attributes that the handwritten GPT does not have.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from llmtrain.errors import UserError
from llmtrain.interop.folders import write_folder

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_TARGETS = ("attn.qkv", "attn.out_proj")
ADAPTER_META = "llmtrain_adapter.json"  # beside a LoRA adapter: {"base": <init_from of its base>, the run's record}


def _matches(name: str, target: str) -> bool:
    """peft's rule for a `target_modules` entry: the module's full name, or a suffix of it after a dot."""
    return name == target or name.endswith("." + target)


def _linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct endings of the model's linear layers (blocks.0.attn.qkv -> attn.qkv), in model order."""
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            suffix = ".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else name
            if suffix not in out:
                out.append(suffix)
    return out


def _check_names(model: nn.Module, target_modules: Sequence[str], modules_to_save: Sequence[str]) -> None:
    """Every target must hit an nn.Linear whose weight is not tied, every module to save some module; report all."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    module_names = [n for n, _ in model.named_modules() if n]
    problems = []
    for target in target_modules:
        if not any(_matches(n, target) for n in linear_names):
            problems.append(
                f"finetune.lora.target_modules: {target!r} matches no linear layer of the model "
                f"(linear layers end in: {', '.join(_linear_suffixes(model))}): fix the name"
            )
    for name in modules_to_save:
        if not any(_matches(n, name) for n in module_names):
            problems.append(
                f"finetune.lora.modules_to_save: {name!r} matches no module of the model "
                f"(top-level modules: {', '.join(n for n, _ in model.named_children())}): fix the name"
            )
    owners: dict[int, list[str]] = {}  # tensor id -> every module holding it (tied weights have two)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(_matches(name, t) for t in target_modules):
            others = [o for o in owners[id(module.weight)] if o != name]
            if others:
                problems.append(
                    f"finetune.lora.target_modules: {name!r} shares its weight with {others[0]!r} (tied weights): "
                    f"merging its adapter would change {others[0]!r} too; drop it from the targets or untie it "
                    "(model.tie_weights=false)"
                )
    if problems:
        raise UserError("; ".join(problems))


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    modules_to_save: Sequence[str] | None = None,
) -> PeftModel:
    """Wrap `model` in LoRA adapters on `target_modules`; freeze everything else except `modules_to_save`.

    peft injects the adapters into `model` itself (it is modified in place and becomes `result.base_model.model`).
    Targets follow peft's matching, the full module name or a suffix after a dot: "attn.qkv" hits
    `blocks.N.attn.qkv` in every block. Each is checked first to match at least one nn.Linear, so that a typo fails
    here instead of training nothing.

    Weight tying (GPT-2's, `GPT.tied`): the default targets leave the LM head alone, so it
    stays frozen and tied -- the LM head is not adapted. Targeting a tied head is refused: `merge` would write the
    head's update into the shared tensor and so change the token embedding too. For classification, give the
    model a new, untied head (`model.head = nn.Linear(emb_dim, n_classes)`) before this call and list it in
    `modules_to_save=["head"]`: peft trains a full copy of it and saves it with the adapter. (A still-tied head in
    `modules_to_save` would train an untied copy while the embedding stays frozen.)

    Create the optimizer after this call, over `p for p in result.parameters() if p.requires_grad`.
    """
    from peft import LoraConfig, get_peft_model

    target_modules = list(target_modules)
    modules_to_save = list(modules_to_save or [])
    if r < 1:
        raise UserError(f"finetune.lora.r must be a positive integer, got {r}: set e.g. finetune.lora.r=8")
    if not target_modules:
        raise UserError("finetune.lora.target_modules is empty: list the linear layers to adapt, e.g. [attn.qkv]")
    _check_names(model, target_modules, modules_to_save)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameter counts; a parameter shared by two modules counts once."""
    params = list(model.parameters())  # nn.Module.parameters() yields each shared tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total, trainable / total if total else 0.0


def format_trainable(model: nn.Module) -> str:
    """One line for the log, e.g. 'trainable params: 147,456 of 7,353,344 (2.01%)'."""
    trainable, total, fraction = trainable_summary(model)
    return f"trainable params: {trainable:,} of {total:,} ({fraction:.2%})"


def save_adapter(peft_model: PeftModel, out_dir: str | Path) -> Path:
    """Write only the adapter (and modules_to_save) in peft's layout: adapter_config.json + adapter_model.safetensors.

    The base weights are not included: loading needs the same base model, bit for bit. Written as
    folders.write_folder writes: whole or not at all, other files in out_dir left as they are.
    """
    return write_folder(Path(out_dir), lambda tmp: peft_model.save_pretrained(str(tmp)),
                        lambda p: (p / "adapter_config.json").is_file(), "llmtrain's LoRA adapter")


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, trainable: bool = False,
                 key: str = "ckpt_path") -> PeftModel:
    """Put the adapter saved in `adapter_dir` onto `base_model` (modified in place); frozen unless `trainable`.
    `key`: the argument that named the folder, for the error messages.

    The base must hold the very weights the adapter was trained on: peft cannot tell, and a different base gives
    wrong outputs without an error. If the adapter was trained with a replaced head (modules_to_save), give
    `base_model` a head of the same shape first.
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(
            f"{key}={str(path)!r} is not a directory: point it at a folder written by "
            "save_adapter (with adapter_config.json)"
        )
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"{key}={str(path)!r} has no adapter_config.json: point it at a folder written by "
            "save_adapter"
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)


def merge(peft_model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights (W + alpha/r * B @ A) and return the plain model class again.

    The result has ordinary nn.Linear layers and the base model's own state-dict keys; modules_to_save copies
    replace the originals.
    """
    return peft_model.merge_and_unload()


def plain_gpt(model: nn.Module) -> nn.Module:
    """The model itself when it is no peft model, else a merged copy (the wrapped model keeps its adapters)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return merge(copy.deepcopy(model))
