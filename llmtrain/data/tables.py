"""Fine-tuning data: labelled texts (classify) and instruction records (instruct), small enough for memory.

Rows come from `sources.load_table_splits` (shipped splits, local tables, Hub datasets), are tokenized once in
`setup`, and are padded per batch. The contract with the LightningModule:

- classify: `input_ids` (B, T) right-padded, `lengths` (B,), `label` (B,);
- instruct: `input_ids` (B, T), `labels` (B, T) with IGNORE_INDEX (-100) on the prompt and on padding,
  `lengths` (B,).
"""

from __future__ import annotations

import random
from itertools import count, islice

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from llmtrain.data.choice import TABLE_SOURCES, choose_source
from llmtrain.data.loaders import ResumableLoader, eval_loader, trainer_batches_done
from llmtrain.data.packing import pack, packed_batch
from llmtrain.data.prompts import record_prompt
from llmtrain.data.sources import SPLITS, load_table_splits, weyl
from llmtrain.data.tokenizer import bos_prefix, build_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.losses import IGNORE_INDEX


def keep_answered(items: list, split: str, what: str, max_length: int, max_dropped: float) -> list:
    """The items that truncation left with a response (None: lost it), saying how many were left out: a split that
    shrinks unseen makes its metrics about other data. More than the share max_dropped (data.max_dropped_fraction)
    left out, or none left, is one line."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise UserError(f"no {split} {what} keeps a response token after truncation to data.max_length={max_length}: "
                        f"raise data.max_length")
    dropped = len(items) - len(kept)
    if dropped > max_dropped * len(items):
        raise UserError(f"{dropped} of {len(items)} {split} {what}s ({dropped / len(items):.0%}) lose their whole "
                        f"response to truncation at data.max_length={max_length}, more than "
                        f"data.max_dropped_fraction={max_dropped}: raise data.max_length, or data.max_dropped_fraction "
                        f"to train and evaluate without them")
    if dropped:
        print(f"data: {len(items) - len(kept)} of {len(items)} {split} {what}s lose their whole response to "
              f"truncation at data.max_length={max_length} and are left out (raise data.max_length to keep them)",
              flush=True)
    return kept


def pad_batch(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are padded with IGNORE_INDEX."""
    longest = max(len(s) for s in seqs)
    batch = {
        "input_ids": torch.tensor([s + [pad_id] * (longest - len(s)) for s in seqs]),
        "lengths": torch.tensor([len(s) for s in seqs]),
    }
    if labels is not None:
        batch["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (longest - len(lab)) for lab in labels])
    return batch


def encode_instruction(tok, record: dict, max_length: int, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Instruction record -> (input_ids, labels), both of the same length <= max_length.

    The full sequence is prompt + response + <|endoftext|>; labels are the inputs shifted by one, so the
    end-of-text token is a target exactly once. With mask_prompt the prompt's targets are IGNORE_INDEX.
    """
    prompt = bos_prefix(tok) + tok.encode_ordinary(record_prompt(record))
    response = tok.encode_ordinary(record["output"]) + [tok.eot_token]
    full = (prompt + response)[: max_length + 1]
    input_ids, labels = full[:-1], full[1:]
    if mask_prompt:
        n_masked = min(len(prompt) - 1, len(labels))
        labels = [IGNORE_INDEX] * n_masked + labels[n_masked:]
    return input_ids, labels


class ListDataset(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TableDataModule(L.LightningDataModule):
    """Shared loading, splitting and loaders of the fine-tuning tables; subclasses tokenize rows in `setup`."""

    embedded_prefix = ""

    def __init__(self, *, source: str, path: str | list[str] | None, subset: str | None, split: str,
                 tokenizer: str, context_length: int, max_length: int | None, max_train_samples: int | None,
                 val_fraction: float, test_fraction: float, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.source, self.path = choose_source(source, path, TABLE_SOURCES), path
        self.subset, self.split = subset, split
        self.tokenizer_name, self.val_fraction, self.test_fraction = tokenizer, val_fraction, test_fraction
        self.max_length = min(max_length or context_length, context_length)
        self.context_length = context_length
        self.max_train_samples = max_train_samples
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sets: dict[str, ListDataset] = {}

    @property
    def tokenizer(self):
        return build_tokenizer(self.tokenizer_name)

    def load_rows(self) -> dict[str, list[dict]]:
        rows = load_table_splits(self.source, self.path, self.embedded_prefix, self.split, self.subset,
                                 self.val_fraction, self.test_fraction)
        for s in SPLITS:
            if not rows[s]:
                raise UserError(f"data.path={self.path!r}: the {s} split is empty: add rows or raise data.{s}_fraction"
                                if s != "train" else f"data.path={self.path!r} holds no rows")
        return rows

    def where(self, split: str, number: int) -> str:
        """A record as a user finds it: the row of a local file (split by index, sources.weyl), else its split's."""
        if self.source in ("embedded", "hub"):
            return f"{split} record {number}"
        bounds = {"val": (0, self.val_fraction), "test": (self.val_fraction, self.val_fraction + self.test_fraction),
                  "train": (self.val_fraction + self.test_fraction, 1)}[split]
        rows = (i for i in count() if bounds[0] <= weyl(i) < bounds[1])
        return f"data.path row {next(islice(rows, number, None))} ({split} record {number})"

    def limit_train(self) -> None:
        """data.max_train_samples: keep the first N training records (e.g. one batch for debug=overfit)."""
        if self.max_train_samples is not None:
            self.sets["train"] = ListDataset(self.sets["train"].items[: self.max_train_samples])

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               batches_done=lambda: trainer_batches_done(self.trainer),
                               num_workers=self.num_workers, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.sets["val"], self.batch_size, self.seed, num_workers=self.num_workers,
                           collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.sets["test"], self.batch_size, self.seed, num_workers=self.num_workers,
                           collate_fn=self.collate)


def require_columns(rows: dict[str, list[dict]], columns: list[str], hint: str) -> None:
    for split, items in rows.items():
        if items:
            missing = [c for c in columns if c not in items[0]]
            if missing:
                raise UserError(
                    f"the {split} rows have no column {', '.join(map(repr, missing))} (columns: "
                    f"{', '.join(items[0])}): {hint}"
                )
            for n, item in enumerate(items):
                if any(item.get(c) is None for c in columns):
                    bad = [c for c in columns if item.get(c) is None]
                    raise UserError(f"{split} row {n} has no value for {', '.join(bad)}: fix or drop that row")


class ClassifyDataModule(TableDataModule):
    """Texts with labels -> (input_ids, lengths, label); label names are mapped to ids from the train split."""

    embedded_prefix = "classify"

    def __init__(self, *, text_column: str, label_column: str, balance: bool, **table) -> None:
        super().__init__(**table)
        self.text_column, self.label_column, self.balance = text_column, label_column, balance
        self.label_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self.load_rows()
        require_columns(rows, [self.text_column, self.label_column],
                        "set data.text_column and data.label_column to the table's columns")
        self.label_names = sorted({str(r[self.label_column]) for r in rows["train"]})
        if len(self.label_names) < 2:
            raise UserError(f"data.label_column={self.label_column!r} has one class in train "
                            f"({self.label_names}): a classifier needs at least two")
        for s in ("val", "test"):
            unseen = sorted({str(r[self.label_column]) for r in rows[s]} - set(self.label_names))
            if unseen:
                raise UserError(f"the {s} split has labels never seen in train: {', '.join(unseen)}: "
                                f"fix the labels or the split")
        ids = {name: i for i, name in enumerate(self.label_names)}
        tok = self.tokenizer
        for s in SPLITS:
            items = [((bos_prefix(tok) + tok.encode_ordinary(str(r[self.text_column])))[: self.max_length]
                      or [tok.eot_token],
                      ids[str(r[self.label_column])]) for r in rows[s]]
            if s == "train" and self.balance:
                items = undersample(items, self.seed)
            self.sets[s] = ListDataset(items)
        self.limit_train()

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([ids for ids, _ in items], self.tokenizer.eot_token)
        batch["label"] = torch.tensor([label for _, label in items])
        return batch

    def majority_baseline(self, split: str) -> float:
        labels = [label for _, label in self.sets[split].items]
        return max(labels.count(c) for c in set(labels)) / len(labels)


def undersample(items: list[tuple[list[int], int]], seed: int) -> list[tuple[list[int], int]]:
    """Keep as many examples of each class as the rarest class has (a seeded random choice)."""
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    n = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    kept = [x for c in sorted(by_class) for x in rng.sample(by_class[c], n)]
    rng.shuffle(kept)
    return kept


class InstructDataModule(TableDataModule):
    """Instruction records (instruction, input, output) -> prompt-masked next-token batches padded per batch."""

    embedded_prefix = "instruct"

    def __init__(self, *, mask_prompt: bool, max_dropped_fraction: float, packing: bool, **table) -> None:
        super().__init__(**table)
        self.mask_prompt, self.max_dropped, self.packing = mask_prompt, max_dropped_fraction, packing
        self.records: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self.records = self.load_rows()
        require_columns(self.records, ["instruction", "output"],
                        "instruction records need 'instruction' and 'output' (and optionally 'input')")
        tok = self.tokenizer
        for s in SPLITS:
            pairs = [encode_instruction(tok, r, self.max_length, self.mask_prompt) for r in self.records[s]]
            self.sets[s] = ListDataset(keep_answered(
                [p if any(t != IGNORE_INDEX for t in p[1]) else None for p in pairs], s, "record", self.max_length,
                self.max_dropped))
        self.limit_train()
        if self.packing:  # each item becomes a row of whole records, up to the context's length
            self.sets = {s: ListDataset(pack(d.items, self.context_length)) for s, d in self.sets.items()}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        if self.packing:
            return packed_batch(items, self.tokenizer.eot_token)
        return pad_batch([x for x, _ in items], self.tokenizer.eot_token, [y for _, y in items])
