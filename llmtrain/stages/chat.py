"""Chat fine-tuning: conversations rendered by a chat template, the loss on every assistant turn (its end-of-turn
token included) and on nothing else: not the system or user messages, not the template's scaffolding
(finetune.train_on=assistant). train_on=all trains on every token of the rendering instead.

The targets are the assistant's where the rendered template puts the assistant's turns (data/chat_template.py); the
loss is averaged over those tokens across the optimizer step, so a long answer weighs more than a short one.
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.model.losses import IGNORE_INDEX
from llmtrain.stages.pretrain import Pretrain, lm_loss

TRAIN_ON = ("assistant", "all")


class Chat(Pretrain):
    """The language-modelling loss on the assistant's tokens of every turn."""

    name = "chat"
    data_module = "ChatDataModule"
    data_presets = "data=chat_embedded, data=chat_json or data=chat_parquet"
    counts_vary = True  # assistant tokens per conversation differ
    adds_template_tokens = True  # ChatML's <|im_start|>, <|im_end|> for GPT-2's BPE: the model grows to match

    def __init__(self, train_blocks: str | int, lora: dict | None, loss_chunk: int | None, train_on: str) -> None:
        super().__init__(train_blocks, lora, loss_chunk, sample_prompt=None, sample_tokens=0)
        if train_on not in TRAIN_ON:
            raise ValueError(f"finetune.train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}")
        self.train_on = train_on
        self.chat_template: str | None = None  # the Jinja source the data was rendered with (setup)
        self.end_of_turn: int | None = None  # the id that ends an assistant turn

    def setup(self, datamodule) -> None:
        template = datamodule.template
        self.chat_template, self.end_of_turn = template.source, template.end_of_turn()

    def record(self) -> dict:
        """Checkpoints and exports carry the template (exports write it into tokenizer_config.json) and the
        end-of-turn id (generation_config.json's eos)."""
        return super().record() | {"chat_template": self.chat_template, "end_of_turn": self.end_of_turn}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.train_on == "assistant":
            batch = {**batch, "labels": batch["labels"].masked_fill(~batch["assistant"], IGNORE_INDEX)}
        total, tokens = lm_loss(model, batch, self.loss_chunk)
        return total, tokens, {}
