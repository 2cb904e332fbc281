"""Files written whole or not at all: a kill, a full disk or a reader at the wrong moment never sees half a file.

Every file a run writes for later (metrics.json, the sweep summary, test answers, an adapter's record) goes through
`write_atomic`: the text is written to a temporary file beside the destination, synced, given the user's umask
(not the temporary file's 0600), and renamed over it. `saving` turns a full disk during such a write into one
line naming the file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtrain.errors import UserError


def umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def saving(path: str | os.PathLike) -> Iterator[None]:
    """Around a whole-or-nothing write of path: a full disk (or a quota, a read-only or vanished folder) is one line
    naming the file, and says that the previous one is as it was (the writer renames only a complete file)."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        fix = ("free space there (or point the run at another disk)" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check that the folder exists and is writable")
        raise UserError(f"could not write {path}: {reason}; the previous file (if any) is left as it was: {fix}, "
                        "then run again") from e


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path in one rename (the previous file, if any, stays whole until then). Returns path."""
    path = Path(path)
    with saving(path):
        return _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
