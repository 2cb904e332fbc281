"""Packing: several records per sequence instead of one record per row padded to the batch's longest.

Records of very different lengths padded into one batch spend most of it on padding; packed, a row of the context's
length holds as many whole records as fit (best-fit decreasing: the longest first, each into the row it fills best).
A packed row carries `segments`, the record each position belongs to (0, 1, ... within the row; padding -1): the
model restricts attention to a position's own record and restarts positions at each record (GPT.hidden), so the loss
and gradients are those of the records unpacked. Records are never split across rows.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

from llmtrain.model.losses import IGNORE_INDEX

Record = tuple[list[int], list[int]]  # (input_ids, labels) of one record, of equal length


def pack(items: list[Record], capacity: int) -> list[list[Record]]:
    """Group records into rows of at most `capacity` tokens (each record is at most that long), best fit decreasing.
    The rows come in a fixed order: the same records always give the same rows."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    rows: list[list[Record]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is found by bisection
    for i in order:
        n = len(items[i][0])
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(items[i])
        if room - n > 0:
            insort(free, (room - n, row))
    return rows


def packed_batch(rows: list[list[Record]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids, labels and segments (B, T), right-padded to the longest row (pad_id, IGNORE_INDEX,
    segment -1), and lengths (B,): the real tokens per row."""
    seqs = [[t for x, _ in row for t in x] for row in rows]
    labels = [[t for _, y in row for t in y] for row in rows]
    segments = [[j for j, (x, _) in enumerate(row) for _ in x] for row in rows]
    longest = max(len(s) for s in seqs)

    def padded(lists: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (longest - len(s)) for s in lists])

    return {"input_ids": padded(seqs, pad_id), "labels": padded(labels, IGNORE_INDEX),
            "segments": padded(segments, -1), "lengths": torch.tensor([len(s) for s in seqs])}
