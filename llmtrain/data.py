"""Pretraining data: documents -> token ids cached on disk -> windows of context_length + 1 tokens.

Documents come from the corpus shipped in the package, local text/json/parquet files, or a Hugging Face
Hub dataset (optionally streamed). They are tokenized in batches (several processes for map-style
datasets), joined with <|endoftext|>, split into train and validation by document, and written
incrementally to two flat token files (uint16 when the vocabulary fits) under a cache folder keyed by
the source and the tokenizer, so that a second run starts at once and no corpus is ever held in RAM.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmtrain.errors import UserError
from llmtrain.resume import ResumableLoader, eval_loader, trainer_batches_done
from llmtrain.tokenizer import build_tokenizer

CACHE_VERSION = 1
SOURCES = ("embedded", "text", "json", "parquet", "hub")
_WRITE_BATCH = 1000  # documents per tokenization batch


def embedded_path(name: str) -> str:
    """Path of a data file shipped in llmtrain/assets/data."""
    return str(resources.files("llmtrain.assets").joinpath("data", name))


def resolve_files(path: str | list[str] | None, key: str = "data.path") -> list[str]:
    """Expand a path, glob or list of them into existing files, or explain what is missing."""
    if not path:
        raise UserError(f"{key} is not set: give a file, a glob or a list, e.g. {key}='books/*.txt'")
    patterns = [path] if isinstance(path, str) else list(path)
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(f"{key}={pattern!r} matches no file (cwd: {os.getcwd()}): fix the path or the glob")
        files += matches
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"{key}: file {f!r} is empty: remove it or point {key} at files with text")
    return files


def load_documents(
    source: str,
    path: str | list[str] | None = None,
    subset: str | None = None,
    split: str = "train",
    text_column: str = "text",
    sample_by: str = "paragraph",
    streaming: bool = False,
):
    """A `datasets` Dataset (or IterableDataset when streaming) with the documents in `text_column`."""
    import datasets

    datasets.disable_progress_bars()
    if source not in SOURCES:
        raise UserError(f"data.source={source!r} is not known: choose one of {', '.join(SOURCES)}")
    try:
        if source == "embedded":
            files = [embedded_path(path or "entries.jsonl.gz")]
            ds = datasets.load_dataset("json", data_files=files, split="train", streaming=streaming)
        elif source == "hub":
            if not path:
                raise UserError("data.path is not set: give the Hub dataset, e.g. data.path=roneneldan/TinyStories")
            ds = datasets.load_dataset(path, subset, split=split, streaming=streaming)
        else:
            files = resolve_files(path)
            kwargs = {"sample_by": sample_by} if source == "text" else {}
            ds = datasets.load_dataset(source, data_files=files, split="train", streaming=streaming, **kwargs)
    except UserError:
        raise
    except Exception as e:  # unreadable file, wrong format, Hub unreachable
        where = path if source != "embedded" else "the embedded corpus"
        raise UserError(f"could not load data.source={source} data.path={where!r}: {describe_load_error(e)}") from e
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise UserError(
            f"data.text_column={text_column!r} is not a column of data.path={path!r} (columns: {', '.join(columns)}): "
            f"set data.text_column to the one that holds the text"
        )
    return ds


def describe_load_error(e: BaseException) -> str:
    """The cause a user can act on, from the chain of exceptions `datasets` wraps around it."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for err in chain:
        if isinstance(err, UnicodeDecodeError):
            return (f"the file is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                    f"{err.start}): convert it, e.g. iconv -f latin1 -t utf-8")
    inner = chain[-1]
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__


def _is_val(doc_index: int, val_fraction: float) -> bool:
    """A fixed, order-based document split: a Weyl sequence spreads validation documents evenly."""
    return (((doc_index + 1) * 2654435761) % 2**32) / 2**32 < val_fraction


class TokenCache:
    """train.bin / val.bin / meta.json in one folder per (source, tokenizer, split settings)."""

    def __init__(self, root: str | os.PathLike, key: dict) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root).expanduser() / "tokens" / digest
        self.key = key

    def exists(self) -> bool:
        return (self.dir / "meta.json").is_file()

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def build(self, documents, tokenizer_name: str, text_column: str, val_fraction: float, num_proc: int,
              max_documents: int | None = None) -> None:
        """Tokenize `documents` into a temporary folder, then move it into place in one rename."""
        tok = build_tokenizer(tokenizer_name)
        eot = tok.eot_token
        dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32

        def encode(batch: dict) -> dict:
            return {"ids": [ids + [eot] for ids in tok.encode_ordinary_batch(batch[text_column], num_threads=1)]}

        if max_documents is not None:
            documents = documents.take(max_documents) if hasattr(documents, "take") else documents
        remove = documents.column_names
        if hasattr(documents, "num_rows") and num_proc > 1 and documents.num_rows >= 4 * _WRITE_BATCH:
            ids = documents.map(encode, batched=True, num_proc=num_proc, remove_columns=remove)
        else:
            ids = documents.map(encode, batched=True, remove_columns=remove)

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=self.dir.parent))
        counts = {"train": 0, "val": 0}
        docs = {"train": 0, "val": 0}
        try:
            with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
                out = {"train": ftrain, "val": fval}
                index = 0
                for batch in _batches(ids):
                    for seq in batch:
                        split = "val" if _is_val(index, val_fraction) else "train"
                        out[split].write(np.asarray(seq, dtype=dtype).tobytes())
                        counts[split] += len(seq)
                        docs[split] += 1
                        index += 1
            meta = {"dtype": np.dtype(dtype).name, "tokens": counts, "documents": docs, "key": self.key}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process finished the same cache first
                if not self.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _batches(ds) -> Iterator[list[list[int]]]:
    for batch in ds.iter(batch_size=_WRITE_BATCH):
        yield batch["ids"]


class TokenWindows(Dataset):
    """Non-overlapping windows of context_length + 1 tokens: x = w[:-1], y = w[1:]."""

    def __init__(self, bin_path: str | os.PathLike, dtype: str, context_length: int) -> None:
        self.bin_path, self.dtype, self.context_length = str(bin_path), dtype, context_length
        self.n_tokens = os.path.getsize(self.bin_path) // np.dtype(dtype).itemsize
        self._tokens = None  # opened lazily so that the dataset pickles into worker processes

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.context_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        start = i * self.context_length
        w = torch.from_numpy(self._tokens[start : start + self.context_length + 1].astype(np.int64))
        return {"input_ids": w[:-1], "labels": w[1:]}


class TextDataModule(L.LightningDataModule):
    """Next-token prediction on a corpus of documents (see the module docstring for the pipeline)."""

    def __init__(
        self,
        source: str = "embedded",
        path: str | list[str] | None = None,
        subset: str | None = None,
        split: str = "train",
        text_column: str = "text",
        sample_by: str = "paragraph",
        streaming: bool = False,
        max_documents: int | None = None,
        tokenizer: str = "gpt2",
        context_length: int = 128,
        val_fraction: float = 0.05,
        batch_size: int = 16,
        num_workers: int = 0,
        num_proc: int = 2,
        cache_dir: str = "~/.cache/llmtrain",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
        self.source, self.path, self.subset, self.split = source, path, subset, split
        self.text_column, self.sample_by, self.streaming = text_column, sample_by, streaming
        self.max_documents, self.tokenizer_name = max_documents, tokenizer
        self.context_length, self.val_fraction = context_length, val_fraction
        self.batch_size, self.num_workers, self.num_proc = batch_size, num_workers, num_proc
        self.seed = seed  # the shuffle order of each epoch follows from (seed, epoch)
        self.cache = TokenCache(cache_dir, self._cache_key())
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    def _cache_key(self) -> dict:
        key = {
            "version": CACHE_VERSION, "source": self.source, "subset": self.subset, "split": self.split,
            "text_column": self.text_column, "tokenizer": self.tokenizer_name, "val_fraction": self.val_fraction,
            "max_documents": self.max_documents,
        }
        if self.source == "text":
            key["sample_by"] = self.sample_by
        if self.source in ("text", "json", "parquet"):  # local files: their identity includes size and mtime
            key["files"] = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
                            for f in resolve_files(self.path)]
        else:
            key["path"] = self.path
            if self.source == "embedded":
                key["files"] = os.path.getsize(embedded_path(self.path or "entries.jsonl.gz"))
        return key

    @property
    def tokenizer(self):
        return build_tokenizer(self.tokenizer_name)

    def prepare_data(self) -> None:
        if self.cache.exists():
            return
        docs = load_documents(self.source, self.path, self.subset, self.split, self.text_column,
                              self.sample_by, self.streaming)
        self.cache.build(docs, self.tokenizer_name, self.text_column, self.val_fraction, self.num_proc,
                         self.max_documents)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        meta = self.cache.meta
        window = self.context_length + 1
        where = f"data.source={self.source}" + (f" data.path={self.path!r}" if self.path else "")
        if meta["tokens"]["train"] == 0:
            raise UserError(f"{where} holds no text: point data.path at non-empty documents")
        if meta["tokens"]["train"] < window:
            raise UserError(
                f"{where} has {meta['tokens']['train']} training tokens, fewer than one window of "
                f"context_length+1={window}: add text or lower data.context_length"
            )
        if meta["tokens"]["val"] < window:
            raise UserError(
                f"{where}: the validation split has {meta['tokens']['val']} tokens, fewer than one window of "
                f"{window} ({meta['documents']['val']} of {sum(meta['documents'].values())} documents): raise "
                f"data.val_fraction, add documents (for text files, data.sample_by=paragraph splits them), "
                f"or lower data.context_length"
            )
        self.train_set = TokenWindows(self.cache.dir / "train.bin", meta["dtype"], self.context_length)
        self.val_set = TokenWindows(self.cache.dir / "val.bin", meta["dtype"], self.context_length)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               batches_done=lambda: trainer_batches_done(self.trainer), drop_last=True,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, self.batch_size, self.seed, num_workers=self.num_workers)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning data: labelled texts (classify) and instruction records (instruct), small enough for memory.
# ---------------------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
TABLE_SOURCES = ("embedded", "csv", "tsv", "json", "parquet", "hub")


def _split_by_index(i: int, val_fraction: float, test_fraction: float) -> str:
    u = (((i + 1) * 2654435761) % 2**32) / 2**32
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def load_table_splits(
    source: str,
    path: str | list[str] | None,
    embedded_prefix: str,
    split: str = "train",
    subset: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[dict]]:
    """Rows of a table as {"train": [...], "val": [...], "test": [...]}.

    `embedded` reads the shipped <prefix>_{train,val,test}.jsonl.gz; a local file/glob or a Hub dataset with a
    single split is divided by a fixed rule on the row index (val_fraction, test_fraction); a Hub dataset
    that has validation/test splits of its own keeps them. Label columns of type ClassLabel become names.
    """
    import datasets

    datasets.disable_progress_bars()
    if source not in TABLE_SOURCES:
        raise UserError(f"data.source={source!r} is not known here: choose one of {', '.join(TABLE_SOURCES)}")
    try:
        if source == "embedded":
            files = {s: embedded_path(f"{embedded_prefix}_{s}.jsonl.gz") for s in SPLITS}
            loaded = datasets.load_dataset("json", data_files=files)
            return {s: _rows(loaded[s]) for s in SPLITS}
        if source == "hub":
            if not path:
                raise UserError("data.path is not set: give the Hub dataset name")
            loaded = datasets.load_dataset(path, subset)
            own = {"val": next((k for k in ("validation", "val", "dev") if k in loaded), None),
                   "test": "test" if "test" in loaded else None}
            if own["val"] and own["test"]:
                return {"train": _rows(loaded[split]), "val": _rows(loaded[own["val"]]),
                        "test": _rows(loaded[own["test"]])}
            rows = _rows(loaded[split])
        else:
            files = resolve_files(path)
            builder, kwargs = ("csv", {"delimiter": "\t"}) if source == "tsv" else (source, {})
            rows = _rows(datasets.load_dataset(builder, data_files=files, split="train", **kwargs))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load data.source={source} data.path={path!r}: {describe_load_error(e)}") from e
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, row in enumerate(rows):
        out[_split_by_index(i, val_fraction, test_fraction)].append(row)
    return out


def _rows(ds) -> list[dict]:
    rows = ds.to_list()
    for name, feature in ds.features.items():
        names = getattr(feature, "names", None)
        if names:  # ClassLabel: store the label's name, not its index
            for row in rows:
                row[name] = names[row[name]]
    return rows


def _require_columns(rows: dict[str, list[dict]], columns: list[str], hint: str) -> None:
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


def pad_batch(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are padded with IGNORE_INDEX (-100)."""
    longest = max(len(s) for s in seqs)
    batch = {
        "input_ids": torch.tensor([s + [pad_id] * (longest - len(s)) for s in seqs]),
        "lengths": torch.tensor([len(s) for s in seqs]),
    }
    if labels is not None:
        batch["labels"] = torch.tensor([lab + [-100] * (longest - len(lab)) for lab in labels])
    return batch


class _ListDataset(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class _TableDataModule(L.LightningDataModule):
    """Shared loading, splitting and loaders for the small fine-tuning tables."""

    embedded_prefix = ""

    def __init__(self, source="embedded", path=None, subset=None, split="train", tokenizer="gpt2",
                 context_length=1024, max_length=None, val_fraction=0.1, test_fraction=0.1, batch_size=8,
                 num_workers=0, seed=0) -> None:
        super().__init__()
        self.source, self.path, self.subset, self.split = source, path, subset, split
        self.tokenizer_name, self.val_fraction, self.test_fraction = tokenizer, val_fraction, test_fraction
        self.max_length = min(max_length or context_length, context_length)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sets: dict[str, _ListDataset] = {}

    @property
    def tokenizer(self):
        return build_tokenizer(self.tokenizer_name)

    def _load(self) -> dict[str, list[dict]]:
        rows = load_table_splits(self.source, self.path, self.embedded_prefix, self.split, self.subset,
                                 self.val_fraction, self.test_fraction)
        for s in SPLITS:
            if not rows[s]:
                raise UserError(f"data.path={self.path!r}: the {s} split is empty: add rows or raise data.{s}_fraction"
                                if s != "train" else f"data.path={self.path!r} holds no rows")
        return rows

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


class ClassifyDataModule(_TableDataModule):
    """Texts with labels -> (input_ids, lengths, label); label names are mapped to ids from the train split."""

    embedded_prefix = "classify"

    def __init__(self, text_column: str = "text", label_column: str = "label", balance: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_column, self.label_column, self.balance = text_column, label_column, balance
        self.label_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        rows = self._load()
        _require_columns(rows, [self.text_column, self.label_column],
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
            items = [(tok.encode_ordinary(str(r[self.text_column]))[: self.max_length] or [tok.eot_token],
                      ids[str(r[self.label_column])]) for r in rows[s]]
            if s == "train" and self.balance:
                items = _undersample(items, self.seed)
            self.sets[s] = _ListDataset(items)

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([ids for ids, _ in items], self.tokenizer.eot_token)
        batch["label"] = torch.tensor([label for _, label in items])
        return batch

    def majority_baseline(self, split: str = "test") -> float:
        labels = [label for _, label in self.sets[split].items]
        return max(labels.count(c) for c in set(labels)) / len(labels)


def _undersample(items: list[tuple[list[int], int]], seed: int) -> list[tuple[list[int], int]]:
    """Keep as many examples of each class as the rarest class has (a seeded random choice)."""
    import random

    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    n = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    kept = [x for c in sorted(by_class) for x in rng.sample(by_class[c], n)]
    rng.shuffle(kept)
    return kept


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (Taori et al., 2023) for a record; the response follows it directly."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def encode_instruction(tok, record: dict, max_length: int, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Alpaca record -> (input_ids, labels), both of the same length <= max_length.

    The full sequence is prompt + response + <|endoftext|>; labels are the inputs shifted by one, so the
    end-of-text token is a target exactly once. With mask_prompt the prompt's targets are IGNORE_INDEX.
    """
    prompt = tok.encode_ordinary(format_prompt(record["instruction"], record.get("input") or ""))
    response = tok.encode_ordinary(record["output"]) + [tok.eot_token]
    full = (prompt + response)[: max_length + 1]
    input_ids, labels = full[:-1], full[1:]
    if mask_prompt:
        n_masked = min(len(prompt) - 1, len(labels))
        labels = [-100] * n_masked + labels[n_masked:]
    return input_ids, labels


class InstructDataModule(_TableDataModule):
    """Alpaca records (instruction, input, output) -> prompt-masked next-token batches padded per batch."""

    embedded_prefix = "instruct"

    def __init__(self, mask_prompt: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_prompt = mask_prompt
        self.records: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self.records = self._load()
        _require_columns(self.records, ["instruction", "output"],
                         "instruction records need 'instruction' and 'output' (and optionally 'input')")
        tok = self.tokenizer
        for s in SPLITS:
            pairs = [encode_instruction(tok, r, self.max_length, self.mask_prompt) for r in self.records[s]]
            self.sets[s] = _ListDataset([p for p in pairs if any(t != -100 for t in p[1])])
            if not self.sets[s].items:
                raise UserError(f"no {s} record keeps a response token after truncation to "
                                f"data.max_length={self.max_length}: raise data.max_length")

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch([x for x, _ in items], self.tokenizer.eot_token, [y for _, y in items])
