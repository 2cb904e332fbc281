"""Pretraining data: documents -> token ids cached on disk -> windows of context_length + 1 tokens.

Documents come from `sources.py` (the corpus shipped in the package, local text/json/parquet files, a Hub
dataset, optionally streamed). They are tokenized in batches (several processes for map-style datasets),
joined with <|endoftext|>, split into train and validation by document, and written incrementally to two flat
token files (uint16 when the vocabulary fits) under a cache folder keyed by the source and the tokenizer, so
that a second run starts at once and no corpus is ever held in RAM. A tokenizer.json is keyed by its content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from llmtrain.data.choice import SOURCES, choose_source
from llmtrain.data.loaders import ResumableLoader, eval_loader, trainer_batches_done
from llmtrain.data.sources import embedded_path, load_documents, resolve_files, weyl
from llmtrain.data.tokenizer import bos_prefix, build_tokenizer, tokenizer_key
from llmtrain.errors import UserError
from llmtrain.files import umask

CACHE_VERSION = 1
_WRITE_BATCH = 1000  # documents per tokenization batch


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
        eot, bos = tok.eot_token, bos_prefix(tok)  # a document is [bos] text <|endoftext|>
        dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32

        def encode(batch: dict, indices: list[int]) -> dict:
            texts = batch[text_column]
            for i, text in zip(indices, texts):
                if not isinstance(text, str):  # tiktoken's TypeError, possibly hours into tokenizing
                    raise UserError(f"data: document {i} (counting from 0) has {text_column}={text!r}, not text: "
                                    f"fix or drop that row (data.text_column names the column read)")
            return {"ids": [bos + ids + [eot] for ids in tok.encode_ordinary_batch(texts, num_threads=1)]}

        if max_documents is not None:
            documents = documents.take(max_documents) if hasattr(documents, "take") else documents
        remove = documents.column_names
        if hasattr(documents, "num_rows") and num_proc > 1 and documents.num_rows >= 4 * _WRITE_BATCH:
            ids = documents.map(encode, batched=True, with_indices=True, num_proc=num_proc, remove_columns=remove)
        else:
            ids = documents.map(encode, batched=True, with_indices=True, remove_columns=remove)

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(self.dir.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_BUILDING}{socket.gethostname()}-{os.getpid()}-", dir=self.dir.parent))
        counts = {"train": 0, "val": 0}
        docs = {"train": 0, "val": 0}
        try:
            with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
                out = {"train": ftrain, "val": fval}
                index = 0
                for batch in _batches(ids):
                    for seq in batch:
                        split = "val" if weyl(index) < val_fraction else "train"
                        out[split].write(np.asarray(seq, dtype=dtype).tobytes())
                        counts[split] += len(seq)
                        docs[split] += 1
                        index += 1
            meta = {"dtype": np.dtype(dtype).name, "tokens": counts, "documents": docs, "key": self.key}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would keep the other users of a shared cache out
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process finished the same cache first
                if not self.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_BUILDING = ".building-"  # a cache being written: .building-<host>-<pid>-<random>


def remove_stale_builds(root: Path) -> list[Path]:
    """Remove the folders that killed tokenizations of this machine left under root (their process is gone), so
    that a kill costs the time it wasted and not the disk too. A build of another machine (a shared cache) is
    left to that machine."""
    host, removed = socket.gethostname(), []
    for folder in root.glob(f"{_BUILDING}*"):
        name_host, _, rest = folder.name.removeprefix(_BUILDING).rpartition("-")[0].rpartition("-")
        if name_host == host and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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

    def __init__(self, *, source: str, path: str | list[str] | None, subset: str | None, split: str,
                 text_column: str, sample_by: str, streaming: bool, max_documents: int | None,
                 max_train_samples: int | None, tokenizer: str, context_length: int, val_fraction: float,
                 batch_size: int, num_workers: int, num_proc: int, cache_dir: str, seed: int) -> None:
        """The keys of conf/data/embedded.yaml (and the presets built on it), plus what the recipe decides:
        context_length (the window), tokenizer (init_from's, if it brings one) and seed."""
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
        self.source, self.path = choose_source(source, path, SOURCES), path
        self.subset, self.split = subset, split
        self.text_column, self.sample_by, self.streaming = text_column, sample_by, streaming
        self.max_documents, self.max_train_samples, self.tokenizer_name = max_documents, max_train_samples, tokenizer
        self.context_length, self.val_fraction = context_length, val_fraction
        self.batch_size, self.num_workers, self.num_proc = batch_size, num_workers, num_proc
        self.seed = seed  # the shuffle order of each epoch follows from (seed, epoch)
        self.cache = TokenCache(cache_dir, self._cache_key())
        self.train_set: TokenWindows | Subset | None = None
        self.val_set: TokenWindows | None = None

    def _cache_key(self) -> dict:
        key = {
            "version": CACHE_VERSION, "source": self.source, "subset": self.subset, "split": self.split,
            "text_column": self.text_column, "tokenizer": tokenizer_key(self.tokenizer_name),
            "val_fraction": self.val_fraction,
            "max_documents": self.max_documents,
        }
        if self.source == "text":
            key["sample_by"] = self.sample_by
        if self.source in ("text", "json", "parquet"):  # local files: their identity includes size and mtime
            key["files"] = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
                            for f in resolve_files(self.path)]
        else:
            key["path"] = self.path  # a Hub name (None for the embedded corpus)
            if self.source == "embedded":
                key["files"] = os.path.getsize(embedded_path("entries.jsonl.gz"))
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
        if self.max_train_samples is not None:  # the first N windows, e.g. one batch for debug=overfit
            self.train_set = Subset(self.train_set, range(min(self.max_train_samples, len(self.train_set))))
        self.val_set = TokenWindows(self.cache.dir / "val.bin", meta["dtype"], self.context_length)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               batches_done=lambda: trainer_batches_done(self.trainer), drop_last=True,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, self.batch_size, self.seed, num_workers=self.num_workers)
