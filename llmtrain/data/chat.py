"""Chat data: conversations (data/conversations.py) rendered by a chat template (data/chat_template.py) into
next-token batches that say which targets are an assistant's.

The contract with the LightningModule: `input_ids` (B, T) right-padded, `labels` (B, T) the next ids (IGNORE_INDEX on
padding), `assistant` (B, T) True where the target belongs to an assistant turn (its end-of-turn token included),
`lengths` (B,). The stage chooses which targets carry loss (finetune.train_on).
"""

from __future__ import annotations

from itertools import count, islice

import torch

from llmtrain.data.chat_template import ChatTemplate, template_source
from llmtrain.data.conversations import read_conversation
from llmtrain.data.sources import SPLITS, weyl
from llmtrain.data.tables import ListDataset, TableDataModule, keep_answered, pad_batch

Item = tuple[list[int], list[int], list[bool]]


class ChatDataModule(TableDataModule):
    """Conversation records -> templated next-token batches with the assistant's targets marked."""

    embedded_prefix = "chat"

    def __init__(self, *, chat_template: str | None, **table) -> None:
        super().__init__(**table)
        self.chat_template = chat_template  # null | chatml | alpaca | a file (chat_template.template_source)
        self.conversations: dict[str, list[list[dict]]] = {}

    @property
    def template(self) -> ChatTemplate:
        return ChatTemplate(template_source(self.chat_template, self.tokenizer_name), self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self.load_rows()
        self.conversations = {s: [read_conversation(r, self.where(s, n)) for n, r in enumerate(rows[s])]
                              for s in SPLITS}
        template = self.template
        for s in SPLITS:
            items = [template.encode_conversation(c, self.max_length) for c in self.conversations[s]]
            self.sets[s] = ListDataset(keep_answered([it if any(it[2]) else None for it in items], s,
                                                     "conversation", self.max_length))
        self.limit_train()

    def where(self, split: str, number: int) -> str:
        """A record as a user finds it: the row of a local file (split by index, sources.weyl), else its split's."""
        if self.source in ("embedded", "hub"):
            return f"{split} record {number}"
        bounds = {"val": (0, self.val_fraction), "test": (self.val_fraction, self.val_fraction + self.test_fraction),
                  "train": (self.val_fraction + self.test_fraction, 1)}[split]
        rows = (i for i in count() if bounds[0] <= weyl(i) < bounds[1])
        return f"data.path row {next(islice(rows, number, None))} ({split} record {number})"

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        batch = pad_batch([x for x, _, _ in items], self.tokenizer.eot_token, [y for _, y, _ in items])
        longest = batch["input_ids"].size(1)
        batch["assistant"] = torch.tensor([a + [False] * (longest - len(a)) for _, _, a in items])
        return batch
