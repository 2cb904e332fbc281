"""Where data comes from: the files shipped in the package, local files and globs, Hugging Face Hub datasets.

Two readers: `load_documents` gives the documents of a pretraining corpus (a `datasets` Dataset, streamed or
not), `load_table_splits` the rows of a labelled table split into train/val/test. Both turn every failure a
user can cause (a missing file, a wrong column, a file that is not UTF-8, an unreachable Hub) into one
UserError line.
"""

from __future__ import annotations

import glob
import os
from importlib import resources

import datasets

from llmtrain.data.choice import SOURCES, TABLE_SOURCES
from llmtrain.errors import UserError

SPLITS = ("train", "val", "test")

datasets.disable_progress_bars()


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


def load_documents(source: str, path: str | list[str] | None, subset: str | None, split: str, text_column: str,
                   sample_by: str, streaming: bool, revision: str | None = None):
    """A `datasets` Dataset (or IterableDataset when streaming) with the documents in `text_column`.

    `embedded` reads the corpus shipped in the package (`path` null); `text`, `json` and `parquet` read local
    files or globs; `hub` a dataset name (or a local folder in the Hub's layout) with its `subset` and `split`, at
    `revision` (a commit, tag or branch; None: the newest).
    """
    if source not in SOURCES:
        raise UserError(f"data.source={source!r} is not known: choose one of {', '.join(SOURCES)}")
    try:
        if source == "embedded":
            files = [embedded_path("entries.jsonl.gz")]
            ds = datasets.load_dataset("json", data_files=files, split="train", streaming=streaming)
        elif source == "hub":
            if not path:
                raise UserError("data.path is not set: give the Hub dataset, e.g. data.path=roneneldan/TinyStories")
            ds = datasets.load_dataset(path, subset, split=split, streaming=streaming, revision=revision)
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


def load_table_splits(source: str, path: str | list[str] | None, embedded_prefix: str, split: str,
                      subset: str | None, val_fraction: float, test_fraction: float) -> dict[str, list[dict]]:
    """Rows of a table as {"train": [...], "val": [...], "test": [...]}.

    `embedded` reads the shipped <prefix>_{train,val,test}.jsonl.gz; a local file/glob or a Hub dataset with a
    single split is divided by a fixed rule on the row index (val_fraction, test_fraction); a Hub dataset
    that has validation/test splits of its own keeps them. Label columns of type ClassLabel become names.
    """
    if source not in TABLE_SOURCES:
        raise UserError(f"data.source={source!r} is not known here: choose one of {', '.join(TABLE_SOURCES)}")
    try:
        if source == "embedded":
            files = {s: embedded_path(f"{embedded_prefix}_{s}.jsonl.gz") for s in SPLITS}
            loaded = datasets.load_dataset("json", data_files=files)
            return {s: _rows(loaded[s]) for s in SPLITS}
        if source == "hub":
            if not path:
                raise UserError("data.path is not set: give the Hub dataset, e.g. data.path=ucirvine/sms_spam")
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
        u = weyl(i)
        out["val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"].append(row)
    return out


def weyl(index: int) -> float:
    """A fixed point in [0, 1) for each index, spread evenly (a Weyl sequence): splits by index, no RNG."""
    return (((index + 1) * 2654435761) % 2**32) / 2**32


def _rows(ds) -> list[dict]:
    rows = ds.to_list()
    for name, feature in ds.features.items():
        names = getattr(feature, "names", None)
        if names:  # ClassLabel: store the label's name, not its index
            for row in rows:
                row[name] = names[row[name]]
    return rows


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
