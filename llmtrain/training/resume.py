"""Every rank's random generators in a checkpoint, so that a resumed run draws the numbers it would have drawn.

The data position is the loaders' own state (data/loaders.py); the weights, optimizer and schedule are Lightning's.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from llmtrain.data.loaders import world


def rng_states() -> dict:
    """This process's generators, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this rank's device
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's generators, in rank order (a collective: all ranks call it, as they all save checkpoints)."""
    n_ranks, _ = world()
    mine = rng_states()
    if n_ranks == 1:
        return [mine]
    out: list = [None] * n_ranks
    dist.all_gather_object(out, mine)
    return out
