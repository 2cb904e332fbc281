"""Folders written whole or not at all: an export, an adapter. A reader never sees a half-written folder, and a
kill or a full disk in the middle of a write leaves the previous folder as it was."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmtrain.errors import UserError


def write_folder(out: Path, write: Callable[[Path], None], replaceable: Callable[[Path], bool], what: str) -> Path:
    """Call write(tmp) on a new folder beside out, sync its files, and rename it to out (replacing an older out
    only if replaceable(out) or it is empty); a folder left by a killed writer is cleaned up. Returns out."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or replaceable(out))):
        raise UserError(f"{out} exists and is not {what}: export into a new folder, or move this one away")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in out.parent.iterdir():  # left behind by a writer that was killed
        if stale.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            shutil.rmtree(stale, ignore_errors=True)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an older out is moved aside first and deleted after (a directory cannot be renamed over)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
