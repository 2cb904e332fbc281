"""Files written whole (llmtrain/files.py): the previous file stays until the new one is complete."""

import errno
import os
import stat

import pytest

from llmtrain import files
from llmtrain.errors import UserError


def test_a_write_replaces_the_file_whole_with_the_users_umask(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"val/loss": 3.0}\n')
    old = os.umask(0o027)
    try:
        files.write_atomic(path, '{"val/loss": 2.5}\n')
    finally:
        os.umask(old)
    assert path.read_text() == '{"val/loss": 2.5}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_write_cut_off_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("previous")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(UserError) as e:  # one line naming the file, not a traceback
        files.write_atomic(path, "x" * 10_000)
    assert str(e.value) == (f"could not write {path}: No space left on device; the previous file (if any) is left as "
                            "it was: free space there (or point the run at another disk), then run again")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["metrics.json"]
    with pytest.raises(UserError, match=f"^could not write {tmp_path / 'gone' / 'x.json'}: No such file or directory; "
                                        ".*: check that the folder exists and is writable, then run again$"):
        files.write_atomic(tmp_path / "gone" / "x.json", "")


def test_reading_the_umask_leaves_it_as_it_was():
    old = os.umask(0o027)
    try:
        assert files.umask() == 0o027 and files.umask() == 0o027
    finally:
        os.umask(old)
