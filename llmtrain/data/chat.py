"""Chat data: conversations (data/conversations.py) rendered by a chat template (data/chat_template.py) into
next-token batches that say which targets are an assistant's.

The contract with the LightningModule: `input_ids` (B, T) right-padded, `labels` (B, T) the next ids (IGNORE_INDEX on
padding), `assistant` (B, T) True where the target belongs to an assistant turn (its end-of-turn token included),
`lengths` (B,). The stage chooses which targets carry loss (finetune.train_on).
"""

from __future__ import annotations

import torch

from llmtrain.data.chat_template import ChatTemplate, template_source
from llmtrain.data.conversations import read_conversation, read_records
from llmtrain.data.packing import pack, packed_batch
from llmtrain.data.sources import SPLITS
from llmtrain.data.tables import ListDataset, TableDataModule, keep_answered, pad_batch

Item = tuple[list[int], list[int], list[bool]]


class ChatDataModule(TableDataModule):
    """Conversation records -> templated next-token batches with the assistant's targets marked."""

    embedded_prefix = "chat"

    def __init__(self, *, chat_template: str | None, max_dropped_fraction: float, packing: bool, on_bad_record: str,
                 **table) -> None:
        super().__init__(**table)
        self.chat_template = chat_template  # null | chatml | alpaca | a file (chat_template.template_source)
        self.max_dropped, self.packing, self.on_bad_record = max_dropped_fraction, packing, on_bad_record
        self.conversations: dict[str, list[list[dict]]] = {}

    @property
    def template(self) -> ChatTemplate:
        return ChatTemplate(template_source(self.chat_template, self.tokenizer_name), self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self.load_rows()
        self.conversations = read_records(rows, read_conversation, self.where, self.on_bad_record, "conversation")
        template = self.template
        for s in SPLITS:
            items = [template.encode_conversation(c, self.max_length) for c in self.conversations[s]]
            self.sets[s] = ListDataset(keep_answered([it if any(it[2]) else None for it in items], s,
                                                     "conversation", self.max_length, self.max_dropped))
        self.limit_train()
        if self.packing:  # each item becomes a row of whole conversations, up to the context's length
            self.sets = {s: ListDataset(pack(d.items, self.context_length)) for s, d in self.sets.items()}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        if self.packing:  # rows of packed conversations: the assistant marks of a row run one after another
            batch = packed_batch([[(x, y) for x, y, _ in row] for row in items], self.tokenizer.eot_token)
            marks = [[m for _, _, a in row for m in a] for row in items]
        else:
            batch = pad_batch([x for x, _, _ in items], self.tokenizer.eot_token, [y for _, y, _ in items])
            marks = [a for _, _, a in items]
        longest = batch["input_ids"].size(1)
        batch["assistant"] = torch.tensor([a + [False] * (longest - len(a)) for a in marks])
        return batch
