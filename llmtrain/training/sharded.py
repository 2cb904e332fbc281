"""Weights sharded across ranks (FSDP): what code outside the training and validation steps must do about it.

Under FSDP each rank holds a shard of the weights; a forward pass gathers them, unit by unit, only inside the
steps that Lightning runs through the wrapped model, with every rank taking part. So:

- generation outside those steps (TensorBoard text samples, an instruct stage's test answers) is skipped under
  FSDP, with the reason logged once: a rank-zero `generate` would wait for ranks that never join;
- the final export gathers the full weights (every rank takes part, rank zero receives them on the CPU) and
  writes a plain GPT built from them;
- a LoRA model's adapters and merged export need peft's view of unsharded weights: skipped, with the reason (the
  final state is in checkpoints/last.ckpt).

This is written for GPUs (Lightning refuses FSDP without one); on CPU the tests check it with a stand-in strategy.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from llmtrain.interop.checkpoints import load_state, strip_prefixes
from llmtrain.model.gpt import GPT, GPTConfig

_said: set[str] = set()


def skip_sharded(what: str) -> str:
    """Log, once per process and thing, that `what` is skipped because the weights are sharded; the phrase."""
    phrase = f"no {what} under FSDP (the weights are sharded across ranks)"
    if what not in _said:
        _said.add(what)
        rank_zero_info(f"{phrase}: skipped")
    return phrase


def gathered_gpt(trainer: L.Trainer, config: GPTConfig, num_classes: int | None) -> GPT | None:
    """The full model as a plain GPT on the CPU, on rank zero (None elsewhere): the weights gathered from every
    rank (a collective: call it on all of them) into a GPT of this config, with a classifier's head of num_classes.
    None everywhere when the strategy keeps sharded state dicts (FSDP's state_dict_type=sharded)."""
    if not _full_state_dicts(trainer.strategy):
        return None
    state = trainer.strategy.lightning_module_state_dict()  # FSDP: full tensors on rank zero's CPU, {} elsewhere
    if not trainer.is_global_zero:
        return None
    plain = GPT(config)
    if num_classes is not None:
        plain.replace_head(num_classes)
    wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP's and activation checkpointing's
    state = {_drop(key, wrappers): value for key, value in strip_prefixes(state).items()}
    load_state(plain, state, "the weights gathered from the FSDP ranks")
    return plain


def _full_state_dicts(strategy) -> bool:
    """Whether the strategy's state dict holds whole tensors (on rank zero) rather than shards."""
    if isinstance(strategy, ModelParallelStrategy):
        return not getattr(strategy, "_save_distributed_checkpoint", True)
    return getattr(strategy, "_state_dict_type", "full") == "full"


def _drop(key: str, parts: tuple[str, ...]) -> str:
    for part in parts:
        key = key.replace(part, "")
    return key
