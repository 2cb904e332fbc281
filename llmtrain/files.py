"""Files written whole or not at all: a kill, a full disk or a reader at the wrong moment never sees half a file.

Every file a run writes for later (metrics.json, the sweep summary, test answers, an adapter's record) goes through
`write_atomic`: the text is written to a temporary file beside the destination, synced, given the user's umask
(not the temporary file's 0600), and renamed over it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path in one rename (the previous file, if any, stays whole until then). Returns path."""
    path = Path(path)
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
