"""Preference data for DPO: records {prompt, chosen, rejected}, the prompt in the instruct template.

Rows come from `sources.load_table_splits` like the other fine-tuning tables (shipped splits, local json/parquet/
csv files, Hub datasets in the "standard" preference format: three text columns). Each side of a pair is encoded
as an instruction record would be (`tables.encode_instruction`: prompt + response + <|endoftext|>, labels shifted by
one, the prompt masked), so that only response tokens carry log-probability. The contract with the LightningModule:
a batch of B pairs is `input_ids` (2B, T) and `labels` (2B, T), rows [0, B) the chosen sides and rows [B, 2B) the
rejected sides in the same order, right-padded together (labels with IGNORE_INDEX), and `lengths` (2B,).
"""

from __future__ import annotations

import torch

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


class PreferenceDataModule(TableDataModule):
    """Preference records -> batches of (chosen, rejected) pairs for the DPO loss."""

    embedded_prefix = "preference"

    def __init__(self, *, prompt_column: str, chosen_column: str, rejected_column: str, max_dropped_fraction: float,
                 **table) -> None:
        super().__init__(**table)
        self.max_dropped = max_dropped_fraction
        self.columns = {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}
        self.records: dict[str, list[dict]] = {}  # {prompt, chosen, rejected} per split, for samples and tools

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self.load_rows()
        require_columns(rows, list(self.columns.values()),
                        "set data.prompt_column, data.chosen_column and data.rejected_column to the table's columns")
        self.records = {s: [{k: r[c] for k, c in self.columns.items()} for r in rows[s]] for s in SPLITS}
        for s in SPLITS:
            for key, column in self.columns.items():
                value = self.records[s][0][key]
                if not isinstance(value, str):
                    raise UserError(
                        f"data.{key}_column={column!r} holds {type(value).__name__} values, not text: DPO here reads "
                        f"pairs of plain strings (the standard preference format); turn conversations (lists of "
                        f"messages) into text first")
        tok = self.tokenizer
        for s in SPLITS:
            self.sets[s] = ListDataset(keep_answered([self.encode(tok, r) for r in self.records[s]], s,
                                                     "pair", self.max_length, self.max_dropped))
        self.limit_train()

    def encode(self, tok, record: dict) -> Pair | None:
        """Both sides of a record as (input_ids, labels); None when truncation leaves either without a response."""
        sides = [encode_instruction(tok, {"instruction": record["prompt"], "output": record[side]},
                                    self.max_length, mask_prompt=True) for side in ("chosen", "rejected")]
        if any(all(t == IGNORE_INDEX for t in labels) for _, labels in sides):
            return None
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sides
        return chosen_ids, chosen_labels, rejected_ids, rejected_labels

    def collate(self, items: list[Pair]) -> dict[str, torch.Tensor]:
        seqs = [p[0] for p in items] + [p[2] for p in items]
        labels = [p[1] for p in items] + [p[3] for p in items]
        return pad_batch(seqs, self.tokenizer.eot_token, labels)
