"""What a stage changes around the one training loop: start weights, head, trainable part, LoRA adapters.

| finetune | start weights       | head                  | trains (default)                     |
| -------- | ------------------- | --------------------- | ------------------------------------ |
| pretrain | random or init_from | LM head               | everything                           |
| classify | init_from           | new head to classes   | last block + final LayerNorm + head  |
| instruct | init_from           | LM head               | everything                           |
| lora     | init_from           | LM head (or classes)  | LoRA adapters (+ a new head)         |
| dpo      | init_from           | LM head               | everything, or LoRA adapters         |

DPO also keeps the starting weights as its reference: a frozen copy, or with LoRA the base with adapters disabled.

The loss and metrics that go with the task are the LightningModule's; the data format is the data module's.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from llmtrain.data.prompts import format_prompt, record_prompt, template_of
from llmtrain.interop.lora import apply_lora
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT
from llmtrain.run.checks import Effective
from llmtrain.stages.dpo import DPOLoss, reference_for


def build_model(finetune: DictConfig, eff: Effective, init_from: str | None,
                num_classes: int | None) -> nn.Module:
    """The model a stage trains: start weights with the effective config, head, trainable part, adapters."""
    if eff.start is None:
        model = GPT(eff.model_config)
    else:
        model, _ = load_pretrained(str(init_from))
        if eff.model_config.context_length < model.config.context_length:
            model.crop_context(eff.model_config.context_length)
        if eff.model_config.drop_rate != model.config.drop_rate:
            model.set_drop_rate(eff.model_config.drop_rate)
    if num_classes is not None:
        model.replace_head(num_classes)
    set_trainable(model, finetune.train_blocks)
    if finetune.lora:
        lora = finetune.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=list(lora.target_modules),
                           modules_to_save=["head"] if num_classes is not None else None)
    return model.train()


def build_preference(finetune: DictConfig, model: nn.Module) -> DPOLoss | None:
    """The DPO loss with its reference, taken from the model a stage starts with (before any step); None for
    the other tasks."""
    return DPOLoss(finetune.beta, reference_for(model)) if finetune.task == "dpo" else None


def set_trainable(model: GPT, train_blocks: str | int) -> None:
    """Freeze all but: every parameter ("all"); the last N blocks + final LayerNorm + head (N, or "last" = 1);
    the head only ("head"); nothing ("none", for LoRA, which unfreezes its own adapters)."""
    if train_blocks == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if train_blocks == "none":
        return
    n = {"head": 0, "last": 1}.get(train_blocks, train_blocks)
    if not isinstance(n, int) or not 0 <= n <= len(model.blocks):  # checks.py reports this for configs
        raise ValueError(f"train_blocks={train_blocks!r}: expected all, last, head, none or 0..{len(model.blocks)}")
    for block in list(model.blocks)[len(model.blocks) - n:] if n else []:
        block.requires_grad_(True)
    if n:
        model.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.tied:  # a tied LM head: training it trains the embedding too
        model.tok_emb.requires_grad_(True)


def sample_prompts(finetune: DictConfig, val_records: list[dict] | None) -> list[str]:
    """The prompts continued at each validation for TensorBoard's text tab: the first held-out instructions
    (instruct) or preference prompts (dpo), the configured sample_prompt (lm), none (classify)."""
    if finetune.task == "instruct":
        return [record_prompt(r, template_of("instruct")) for r in val_records[: finetune.num_samples]]
    if finetune.task == "dpo":
        return [format_prompt(r["prompt"], template=template_of("dpo")) for r in val_records[: finetune.num_samples]]
    if finetune.task == "lm" and finetune.sample_prompt:
        return [finetune.sample_prompt]
    return []
