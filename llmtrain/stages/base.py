"""What every stage is: the `Stage` base class, which weights train (`set_trainable`), and the GPT inside a wrapper.

A stage is built from its YAML (`conf/finetune/<name>.yaml` names the class in `_target_`, every other key is an
argument of it) and handed to the LightningModule, which calls it and never asks which stage it is. Adding a stage
means one Python file here and one YAML there.

The LightningModule and the recipe call a stage in this order:
    setup(datamodule)            what the stage reads from the data: labels, held-out prompts
    build_model(gpt)             head, trainable part, LoRA adapters (and DPO's reference) around the start weights
    loss(model, batch)           each training micro-batch: (summed loss, the units it sums over, values to log)
    eval_sums(model, batch)      each evaluation batch: sums, reduced over ranks once at the end of the pass ...
    eval_metrics(totals)         ... and turned into the metrics logged as val/<name> (test/<name>)
    summary(metrics, datamodule) the final line; write_files(...) its own files in the run dir
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from llmtrain.model.gpt import GPT


def inner_gpt(model: nn.Module) -> GPT:
    """The GPT inside any wrapper (peft's PeftModel keeps it at base_model.model)."""
    while not isinstance(model, GPT) and hasattr(model, "base_model"):
        model = model.base_model.model if hasattr(model.base_model, "model") else model.base_model
    return model


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def set_trainable(model: GPT, train_blocks: str | int) -> None:
    """Freeze all but: every parameter ("all"); the last N blocks + final norm + head (N, or "last" = 1);
    the head only ("head"); nothing ("none", for LoRA, which unfreezes its own adapters)."""
    if train_blocks == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if train_blocks == "none":
        return
    n = {"head": 0, "last": 1}.get(train_blocks, train_blocks)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(model.blocks):
        raise ValueError(f"finetune.train_blocks={train_blocks!r} is not one of all, last, head, none or "
                         f"0..{len(model.blocks)} (the last N blocks)")
    for block in list(model.blocks)[len(model.blocks) - n:] if n else []:
        block.requires_grad_(True)
    if n:
        model.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.tied:  # a tied LM head: training it trains the embedding too
        model.tok_emb.requires_grad_(True)


class Stage(nn.Module):
    """One way of training. Subclasses set the class attributes and override what differs.

    A Stage is an nn.Module so that what it holds besides the trained model (DPO's frozen reference) follows the
    model's device and precision; the LightningModule keeps the stage's own weights out of checkpoints (they are
    init_from's, loaded again on resume).
    """

    name: ClassVar[str]  # the stage's one name: conf/finetune/<name>.yaml, checkpoints, exports, messages
    data_module: ClassVar[str]  # the data module class it trains on (cfg.data._target_ must end with it)
    data_presets: ClassVar[str]  # the data presets that provide one, for the message when the data does not fit
    prompt_template: ClassVar[str | None] = None  # the template its records are written in (None: plain text)
    metrics: ClassVar[tuple[str, ...]] = ("loss",)  # what evaluation logs (val/<metric>); HPARAMS compares these
    compared: ClassVar[tuple[str, ...]] = ()  # those the HPARAMS tab compares runs on (empty: all of them)
    progress_metric: ClassVar[str] = "loss"  # the one shown in the progress bar
    counts_vary: ClassVar[bool] = True  # micro-batches of different ranks sum over different numbers of units
    outputs: ClassVar[tuple[str, ...]] = ()  # what write_files adds to the run dir, in words (skipped under FSDP)
    predicts_tokens: ClassVar[bool] = True  # its model ends in the LM head (lm_eval tasks can score it)
    sequences_per_item: ClassVar[int] = 1  # sequences a batch holds per item of data.batch_size (DPO: 2, a pair)
    adds_template_tokens: ClassVar[bool] = False  # the special tokens data.chat_template writes join the tokenizer

    def __init__(self, train_blocks: str | int, lora: dict | None, loss_chunk: int | None = None,
                 sample_tokens: int = 0) -> None:
        super().__init__()
        self.train_blocks, self.lora = train_blocks, dict(lora) if lora else None
        self.loss_chunk = loss_chunk  # tokens per chunk of the LM head + loss (None: all logits at once)
        self.sample_tokens = sample_tokens  # new tokens per sample prompt continued at each validation
        self.sample_prompts: list[str] = []

    # ---- the model ----

    def setup(self, datamodule) -> None:
        """Read what the stage needs from the data module once it is set up (labels, held-out prompts)."""

    def new_head(self) -> int | None:
        """The number of rows of a new head that replaces the LM head (a classifier's classes), or None."""
        return None

    def build_model(self, gpt: GPT) -> nn.Module:
        """The model this stage trains, from its starting GPT: head, trainable part, adapters."""
        rows = self.new_head()
        if rows is not None:
            gpt.replace_head(rows)
        set_trainable(gpt, self.train_blocks)
        if not self.lora:
            return gpt.train()
        from llmtrain.interop.lora import apply_lora  # peft takes seconds to import: only when adapters are asked for

        lora = self.lora
        return apply_lora(gpt, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                          target_modules=list(lora["target_modules"]),
                          modules_to_save=["head"] if rows is not None else None).train()

    # ---- a batch ----

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss summed over this micro-batch's units, how many units, other values to log as train/<name>).
        The LightningModule averages the sums over every unit of the optimizer step."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This batch's contribution to the evaluation sums (float64; "loss" and "count" at least)."""
        loss, count, _ = self.loss(model, batch)
        return {"loss": loss.detach().double(), "count": count.double()}

    def eval_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The metrics (names as in `metrics`) from the sums of the whole split, all ranks together."""
        return {"loss": (totals["loss"] / totals["count"].clamp(min=1)).float()}

    # ---- what the run shows and keeps ----

    def record(self) -> dict:
        """What checkpoints, exports and adapters record about the stage."""
        return {"stage": self.name, "prompt_template": self.prompt_template, "num_classes": None, "label_names": None}

    def summary(self, metrics: dict[str, float], datamodule) -> str:
        """The final line's part after the step count, from the final metrics."""
        return ", ".join(f"val/{m} {metrics[f'val/{m}']:.4f}" for m in self.metrics)

    def test_after_fit(self) -> bool:
        """Whether the recipe evaluates the test split at the end (its metrics join the final ones)."""
        return False

    def write_files(self, model: GPT, datamodule, run_dir: Path) -> list[str]:
        """Write the stage's own files (`outputs`) into the run dir; a phrase for the final line per file."""
        return []

    def resume_problems(self, saved: dict, init_from: str | None, ckpt_path: str) -> list[str]:
        """Why a checkpoint of this stage (`saved`: what it recorded) cannot be resumed by this run, if it cannot."""
        return []
