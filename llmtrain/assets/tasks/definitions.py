"""The documents of the llmtrain_definitions task (its YAML names process_docs): a held-out headword, its own
definition and three definitions of other held-out headwords of the same book, in an order fixed by hashes.

Each record of instruct_test.jsonl.gz asks for one headword's definition (`Define "term" as The Devil's Dictionary
would.` or `What does "term" mean in hacker jargon?`) and answers with it. The wrong choices of a headword are the
next three definitions on a ring of its book's headwords ordered by sha1("choices:" + term); the right one goes to
position sha1("answer:" + term) mod 4. Choices are cut to MAX_CHARS at a word boundary, so that their lengths differ
less and a small context holds them.
"""

from __future__ import annotations

import hashlib
import re

import datasets

CHOICES = 4
MAX_CHARS = 200
REQUEST = re.compile(r'(?:Define|What does) "(.+)" (?:as The Devil\'s Dictionary would\.|mean in hacker jargon\?)')


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


def shorten(text: str, limit: int = MAX_CHARS) -> str:
    """text, or its first words that fit in limit characters."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    entries = []
    for row in dataset:
        match = REQUEST.fullmatch(row["instruction"])
        if match is None:
            raise ValueError(f"not a definition request: {row['instruction']!r}")
        book = "devil" if row["instruction"].startswith("Define") else "jargon"
        entries.append({"term": match.group(1), "book": book, "definition": shorten(row["output"])})
    rings = {book: sorted((e for e in entries if e["book"] == book), key=lambda e: _hash("choices:" + e["term"]))
             for book in ("devil", "jargon")}
    docs = []
    for entry in entries:
        ring = rings[entry["book"]]
        at = ring.index(entry)
        others: list[str] = []
        for step in range(1, len(ring)):
            other = ring[(at + step) % len(ring)]["definition"]
            if other != entry["definition"] and other not in others:
                others.append(other)
            if len(others) == CHOICES - 1:
                break
        answer = _hash("answer:" + entry["term"]) % CHOICES
        choices = others[:answer] + [entry["definition"]] + others[answer:]
        docs.append({"term": entry["term"], "book": entry["book"], "choices": choices, "answer": answer})
    return datasets.Dataset.from_list(docs)
