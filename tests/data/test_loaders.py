"""Loaders across ranks: evaluation shares that count every sample once."""

import pytest
import torch

from llmtrain.data import loaders
from llmtrain.errors import UserError


@pytest.mark.parametrize("n, ranks", [(13, 2), (13, 3), (4, 4), (2, 1)])
def test_evaluation_shares_cover_the_set_once(monkeypatch, n, ranks):
    data = torch.arange(n)
    shares = []
    for rank in range(ranks):
        monkeypatch.setattr(loaders, "world", lambda rank=rank: (ranks, rank))
        loader = loaders.eval_loader(data, batch_size=4, seed=0)
        batches = [b.tolist() for b in loader]
        assert len(loader) == len(batches) and len(loader.sampler) == sum(map(len, batches))
        shares.append(sum(batches, []))
    assert sorted(sum(shares, [])) == list(range(n))  # no sample twice (no padding), none dropped
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_an_evaluation_split_smaller_than_the_ranks_is_refused(monkeypatch):
    monkeypatch.setattr(loaders, "world", lambda: (4, 0))
    with pytest.raises(UserError, match="an evaluation split of 3 samples cannot give each of the 4 ranks one"):
        loaders.eval_loader(torch.arange(3), batch_size=4, seed=0)


class WorkerSeeds(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return torch.utils.data.get_worker_info().seed


def test_worker_seeds_follow_seed_and_epoch():
    """A dataset that draws random numbers in its workers gets new ones each epoch, the same ones on a rerun (or a
    resume) of that epoch."""
    def seeds(epoch: int) -> set[int]:
        loader = loaders.ResumableLoader(WorkerSeeds(), batch_size=2, shuffle=True, seed=7, num_workers=1)
        loader.sampler.set_epoch(epoch)
        return {s for batch in loader for s in batch.tolist()}

    first, second = seeds(0), seeds(1)
    assert first != second and seeds(1) == second
