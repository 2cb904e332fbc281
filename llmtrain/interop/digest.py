"""What identifies the weights a run starts from (init_from: the DPO reference, a LoRA adapter's base): a content
digest of the files behind the name, recorded in checkpoints, exports and adapters beside the name itself, so that
a resume or a merge onto a path whose files were replaced since is refused instead of silently mixing two models.

The digest is sampled, not a hash of every byte: per weight file (a .ckpt; a Hugging Face folder's config.json and
safetensors files), its name and size and 64 KiB read at 32 evenly spaced offsets and at the end (safetensors'
header, which names every tensor with its shape and offsets, is at the start; a .ckpt's zip directory at the end).
Files up to 2 MiB are read whole. Why sampled: init_from may be tens of GB (a sharded Hub model), and it is
identified at every start and every resume; a full hash would read all of it each time (about a minute per 10 GB
here), while these reads cost milliseconds whatever the size. What it sees: any retraining, re-export or other
model rewrites nearly every byte, so its samples differ; what it would miss is an edit of a few bytes between two
samples of a file of unchanged size, which no training or export makes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmtrain.interop.folders import CONFIG
from llmtrain.interop.pretrained import describe

CHUNK = 64 * 1024  # bytes read at each sample
SAMPLES = 32  # evenly spaced samples per file (plus its end)


def weights_digest(init_from: str, key: str = "init_from") -> str:
    """"sha256:<hex>" of the sampled content of the files behind init_from (a Hub name is downloaded first)."""
    path = Path(describe(init_from, key=key).path)
    files = [path] if path.is_file() else sorted([path / CONFIG, *path.glob("*.safetensors")])
    digest = hashlib.sha256()
    for file in files:
        digest.update(sampled(file))
    return "sha256:" + digest.hexdigest()


def sampled(file: Path) -> bytes:
    """The file's name and size, and its bytes at SAMPLES evenly spaced offsets and at its end (all of a small file)."""
    size = file.stat().st_size
    parts = [f"{file.name}\0{size}\0".encode()]
    with open(file, "rb") as f:
        if size <= SAMPLES * CHUNK:
            parts.append(f.read())
        else:
            for offset in [size * i // SAMPLES for i in range(SAMPLES)] + [size - CHUNK]:
                f.seek(offset)
                parts.append(f.read(CHUNK))
    return b"".join(parts)


def changed_weights(init_from: str | None, recorded: str | None, key: str = "init_from") -> str | None:
    """The digest init_from has now, when it differs from the one recorded (None: the same, or nothing to compare:
    no init_from, or a record written before digests were kept)."""
    if init_from is None or recorded is None:
        return None
    now = weights_digest(init_from, key)
    return now if now != recorded else None
