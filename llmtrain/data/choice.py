"""Which source a data node reads: `data.source`, or the one `data.path`'s extension names when the source is left
at `embedded`. Plain Python (no `datasets`), so that the config checks can decide it before anything is imported.
"""

from __future__ import annotations

import os

from llmtrain.errors import UserError

SOURCES = ("embedded", "text", "json", "parquet", "hub")  # pretraining corpora
TABLE_SOURCES = ("embedded", "csv", "tsv", "json", "parquet", "hub")  # labelled tables
EXTENSIONS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
              ".csv": "csv", ".tsv": "tsv"}  # a file's source, by its extension (before .gz)
# The shipped classify/instruct tables come in fixed splits (scripts/build_datasets.py: sha1 of the headword,
# buckets 80-89 val, 90-99 test): the val and test fractions they stand for.
SHIPPED_FRACTIONS = {"val_fraction": 0.1, "test_fraction": 0.1}


def source_of_file(path: str | list[str]) -> str | None:
    """The source a file's extension names (books.txt -> text, rows.jsonl.gz -> json); None when unknown."""
    first = path if isinstance(path, str) else (list(path) or [""])[0]
    name = os.path.basename(str(first)).removesuffix(".gz")
    return EXTENSIONS.get(os.path.splitext(name)[1].lower())


def choose_source(source: str, path: str | list[str] | None, allowed: tuple[str, ...]) -> str:
    """data.source as set, except that a data.path given with `embedded` (the presets' default) is read, never
    ignored: its extension names the source (books.txt -> text), or the mismatch is one line."""
    if source != "embedded" or not path:
        return source
    inferred = source_of_file(path)
    if inferred not in allowed:
        choices = ", ".join(s for s in allowed if s != "embedded")
        raise UserError(f"data.path={path!r} is set but data.source=embedded reads only the data shipped in the "
                        f"package, and the file's extension does not name a source: set data.source to one of "
                        f"{choices}")
    return inferred
