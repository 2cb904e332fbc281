"""Preference data for DPO: records {prompt, chosen, rejected}, as text in the instruct template or as conversations
in a chat template.

Rows come from `sources.load_table_splits` like the other fine-tuning tables (shipped splits, local json/parquet/
csv files, Hub datasets in the "standard" preference format: three text columns, or the "conversational" one:
messages). Text records are encoded as an instruction record would be (`tables.encode_instruction`: prompt +
response + <|endoftext|>, the prompt masked). Records of messages (conversations.read_preference: a prompt of
messages with the final assistant turn as chosen and rejected, or two whole conversations sharing all but their last
message) are rendered whole by the chat template of data.chat_template (data/chat_template.py, as finetune=chat
renders them), and only the final assistant turn's tokens, located in the rendering, carry log-probability. The
template's special tokens must be in the tokenizer already: DPO starts from a chat fine-tune that added them.

The contract with the LightningModule: a batch of B pairs is `input_ids` (2B, T) and `labels` (2B, T), rows [0, B)
the chosen sides and rows [B, 2B) the rejected sides in the same order, right-padded together (labels with
IGNORE_INDEX), and `lengths` (2B,).
"""

from __future__ import annotations

import torch

from llmtrain.data.added_tokens import missing_tokens
from llmtrain.data.chat_template import ChatTemplate, needed_tokens, template_source
from llmtrain.data.conversations import read_preference, read_records
from llmtrain.data.sources import SPLITS
from llmtrain.data.tables import (
    ListDataset,
    TableDataModule,
    encode_instruction,
    keep_answered,
    pad_batch,
    require_columns,
)
from llmtrain.errors import UserError
from llmtrain.model.losses import IGNORE_INDEX

Pair = tuple[list[int], list[int], list[int], list[int]]  # chosen input_ids, labels; rejected input_ids, labels


FORMATS = ("auto", "instruct", "chat")  # data.format: auto = chat for records of messages, instruct for text


class PreferenceDataModule(TableDataModule):
    """Preference records -> batches of (chosen, rejected) pairs for the DPO loss."""

    embedded_prefix = "preference"

    def __init__(self, *, prompt_column: str, chosen_column: str, rejected_column: str, chat_template: str | None,
                 format: str, system: str | None, on_bad_record: str, max_dropped_fraction: float, **table) -> None:
        super().__init__(**table)
        if format not in FORMATS:
            raise UserError(f"data.format={format!r} is not one of {', '.join(FORMATS)}")
        self.max_dropped, self.chat_template, self.on_bad_record = max_dropped_fraction, chat_template, on_bad_record
        self.format, self.system = format, system
        self.columns = {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}
        self.records: dict[str, list[dict]] = {}  # {prompt, chosen, rejected} per split, for samples and tools
        self.conversational = False  # records of messages, rendered by the chat template

    @property
    def template(self) -> ChatTemplate:
        return ChatTemplate(template_source(self.chat_template, self.tokenizer_name), self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self.load_rows()
        first = rows["train"][0]
        self.conversational = self.format == "chat" or (self.format == "auto" and any(
            not isinstance(first.get(c), str) for c in self.columns.values() if c in first))
        needed = [c for k, c in self.columns.items() if k != "prompt" or not self.conversational or c in first]
        require_columns(rows, needed, "set data.prompt_column, data.chosen_column and data.rejected_column to the "
                                      "table's columns")
        named = {s: [{k: r.get(c) for k, c in self.columns.items()} for r in rows[s]] for s in SPLITS}
        read = self.read_messages if self.conversational else self.read_text
        self.records = read_records(named, read, self.where, self.on_bad_record, "pair")
        tok = self.tokenizer
        template = self.checked_template() if self.conversational else None
        for s in SPLITS:
            self.sets[s] = ListDataset(keep_answered([self.encode(tok, r, template) for r in self.records[s]], s,
                                                     "pair", self.max_length, self.max_dropped))
        self.limit_train()

    def read_text(self, record: dict, where: str) -> dict:
        for key, column in self.columns.items():
            if not isinstance(record[key], str):
                raise UserError(f"{where}: data.{key}_column={column!r} holds {type(record[key]).__name__}, not text, "
                                f"where the table's first record holds text: give every record the same layout")
        return record

    def read_messages(self, record: dict, where: str) -> dict:
        if isinstance(record.get("prompt"), str):  # a text request (data.format=chat): the user's turn
            system = [{"role": "system", "content": self.system}] if self.system else []
            record = {**record, "prompt": [*system, {"role": "user", "content": record["prompt"]}]}
        prompt, chosen, rejected = read_preference(record, where)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def checked_template(self) -> ChatTemplate:
        """The chat template, refused when it writes special tokens that the tokenizer lacks (a DPO run does not add
        them: new rows would be untrained in the policy and in its reference alike)."""
        template = self.template
        missing = missing_tokens(template.tok, needed_tokens(template.source))
        if missing:
            raise UserError(f"data.chat_template writes {', '.join(missing)}, which tokenizer {self.tokenizer_name} "
                            f"lacks: start DPO from a chat fine-tune (init_from=<a finetune=chat run>), which added "
                            f"them, or choose a template without them (data.chat_template=alpaca)")
        return template

    def encode(self, tok, record: dict, template: ChatTemplate | None) -> Pair | None:
        """Both sides of a record as (input_ids, labels); None when truncation leaves either without a response."""
        if template is None:
            sides = [encode_instruction(tok, {"instruction": record["prompt"], "output": record[side]},
                                        self.max_length, mask_prompt=True) for side in ("chosen", "rejected")]
        else:
            sides = []
            for side in ("chosen", "rejected"):
                ids, labels, final = template.encode_conversation([*record["prompt"], record[side]], self.max_length,
                                                                  last_turn_only=True)
                sides.append((ids, [y if keep else IGNORE_INDEX for y, keep in zip(labels, final, strict=True)]))
        if any(all(t == IGNORE_INDEX for t in labels) for _, labels in sides):
            return None
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sides
        return chosen_ids, chosen_labels, rejected_ids, rejected_labels

    def collate(self, items: list[Pair]) -> dict[str, torch.Tensor]:
        seqs = [p[0] for p in items] + [p[2] for p in items]
        labels = [p[1] for p in items] + [p[3] for p in items]
        return pad_batch(seqs, self.tokenizer.eot_token, labels)
