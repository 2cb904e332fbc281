"""Which source a data node reads: data.source, or the one data.path's extension names under `embedded`."""

import pytest

from llmtrain.data.choice import SOURCES, TABLE_SOURCES, choose_source, source_of_file
from llmtrain.errors import UserError


@pytest.mark.parametrize("path, source", [
    ("books.txt", "text"), ("notes/READ.MD", "text"), ("rows.jsonl.gz", "json"), ("BOOKS.TXT", "text"),
    ("t.parquet", "parquet"), ("spam.tsv", "tsv"), (["a/x.csv", "a/y.csv"], "csv"), ("data.bin", None), ([], None),
])
def test_a_files_extension_names_its_source(path, source):
    assert source_of_file(path) == source


def test_embedded_with_a_path_reads_the_path_and_a_source_set_is_kept():
    assert choose_source("embedded", "books.txt", SOURCES) == "text"
    assert choose_source("embedded", None, SOURCES) == "embedded"  # the shipped corpus
    assert choose_source("json", "books.txt", SOURCES) == "json"  # as set: the extension does not override it
    assert choose_source("embedded", ["a.csv"], TABLE_SOURCES) == "csv"


@pytest.mark.parametrize("path, allowed", [("rows.csv", SOURCES), ("data.bin", SOURCES), ("notes.txt", TABLE_SOURCES)])
def test_an_extension_the_node_cannot_read_is_one_line_naming_the_sources(path, allowed):
    choices = ", ".join(s for s in allowed if s != "embedded")
    with pytest.raises(UserError, match=rf"data.path='{path}' is set but data.source=embedded .* one of {choices}$"):
        choose_source("embedded", path, allowed)
