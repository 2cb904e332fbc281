"""Every random generator of every rank in a checkpoint: restored, the numbers drawn after it are the same."""

import random

import numpy as np
import torch

from llmtrain.training import resume


def draws() -> tuple:
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()


def test_the_states_restore_every_generator_and_survive_a_safe_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # a Gaussian half-drawn: NumPy keeps the other half
    torch.manual_seed(3)
    torch.save(resume.rng_states(), tmp_path / "rng.pt")
    expected = draws()
    draws()  # move every generator on
    resume.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_with_two_ranks_every_ranks_states_are_gathered_in_rank_order(monkeypatch):
    gathered = []

    def all_gather_object(out: list, mine: dict) -> None:
        gathered.append(mine)
        out[:] = [mine, {"rank": 1}]

    monkeypatch.setattr(resume, "world", lambda: (2, 0))
    monkeypatch.setattr(resume.dist, "all_gather_object", all_gather_object)
    states = resume.gather_rng_states()
    assert len(states) == 2 and states[1] == {"rank": 1} and states[0] is gathered[0]
    assert set(states[0]) == {"python", "numpy", "torch", "cuda"}
    monkeypatch.setattr(resume, "world", lambda: (1, 0))
    assert len(resume.gather_rng_states()) == 1  # one process: no collective
