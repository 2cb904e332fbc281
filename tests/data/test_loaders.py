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
