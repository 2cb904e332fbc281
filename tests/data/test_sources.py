"""Where data comes from: paths, globs and lists resolved to files, and load errors worded as their cause."""

import os
import re

import pytest

from llmtrain.data.sources import describe_load_error, resolve_files
from llmtrain.errors import UserError


def test_globs_descend_with_double_stars_and_lists_keep_their_order(tmp_path):
    for name in ("b/deep/x.txt", "b/y.txt", "a.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text")
    found = resolve_files(str(tmp_path / "b" / "**" / "*.txt"))
    assert found == sorted([str(tmp_path / "b" / "deep" / "x.txt"), str(tmp_path / "b" / "y.txt")])
    assert resolve_files([str(tmp_path / "b" / "y.txt"), str(tmp_path / "a.txt")]) == [
        str(tmp_path / "b" / "y.txt"), str(tmp_path / "a.txt")]


@pytest.mark.parametrize("pattern", ["missing.txt", "folder", "fold*"])
def test_a_path_that_matches_no_file_is_one_line(tmp_path, pattern):
    (tmp_path / "folder").mkdir()
    path = os.path.join(tmp_path, pattern)
    with pytest.raises(UserError, match=re.escape(f"data.path={path!r} matches no file (cwd: ")):
        resolve_files(path)


def test_a_load_error_names_the_innermost_cause():
    try:
        try:
            raise FileNotFoundError("no such file: books.txt\nsecond line")
        except FileNotFoundError as e:
            raise RuntimeError("An error occurred while generating the dataset") from e
    except RuntimeError as wrapped:
        assert describe_load_error(wrapped) == "FileNotFoundError: no such file: books.txt"
    assert describe_load_error(ValueError("bad row")) == "ValueError: bad row"
    try:
        b"caf\xe9".decode()
    except UnicodeDecodeError as e:
        assert describe_load_error(e).startswith("the file is not UTF-8 text (byte b'\\xe9' at offset 3)")
