#!/usr/bin/env python3
"""Build the shipped conversations (``llmtrain/assets/data/chat_{train,val,test}.jsonl.gz``) from the shipped
instruct records of the same split.

Each split's instruct records (one headword each: "Define X as The Devil's Dictionary would." / "What does X mean in
hacker jargon?" and its definition) are ordered by ``sha1("chat:" + instruction)`` and taken two or three at a time
(alternately) into one conversation: the first request as asked, the next ones as follow-ups ("And what does Y mean
...?"), each answered by its own definition; every other conversation opens with a system message. A conversation
holds records of one split only, and the instruct sets were split by headword (scripts/build_datasets.py), so the
held-out conversations hold only held-out headwords, whose texts the pretraining corpus leaves out.

Usage::

    python scripts/build_chat_data.py            # reads and writes llmtrain/assets/data
    python scripts/build_chat_data.py --out DIR

Outputs are byte-for-byte reproducible (sorted input, gzip mtime=0).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_datasets import DEFAULT_OUT, SPLITS, write_jsonl_gz  # noqa: E402

SYSTEM = "You explain words the way The Devil's Dictionary and The Jargon File do: briefly, and in their voice."
TURNS = (2, 3)  # requests per conversation, alternately


def follow_up(instruction: str) -> str:
    """A later request of the same conversation: 'And define "x" ...', 'And what does "x" mean ...?'."""
    return "And " + instruction[0].lower() + instruction[1:]


def conversations(records: list[dict[str, str]]) -> list[dict[str, list[dict[str, str]]]]:
    ordered = sorted(records, key=lambda r: hashlib.sha1(f"chat:{r['instruction']}".encode()).hexdigest())
    out, at = [], 0
    while at < len(ordered):
        group = ordered[at: at + TURNS[len(out) % 2]]
        at += len(group)
        messages = [{"role": "system", "content": SYSTEM}] if len(out) % 2 == 0 else []
        for i, record in enumerate(group):
            request = record["instruction"] if i == 0 else follow_up(record["instruction"])
            messages += [{"role": "user", "content": request}, {"role": "assistant", "content": record["output"]}]
        out.append({"messages": messages})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for split in SPLITS:
        lines = gzip.decompress((DEFAULT_OUT / f"instruct_{split}.jsonl.gz").read_bytes()).decode().splitlines()
        records = [json.loads(line) for line in lines]
        path = args.out / f"chat_{split}.jsonl.gz"
        count = write_jsonl_gz(path, conversations(records))
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"| `{path.name}` | {count} | {path.stat().st_size} | `{sha}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
