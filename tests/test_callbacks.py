"""Our callbacks and checkpoint IO: safe loading, throughput counted in real tokens, MFU from the FLOPs done."""

import pickle

import pytest
import torch

from llmtrain.callbacks import AtomicCheckpointIO


class Payload:
    """An object a pickled checkpoint could carry (and run code while unpickling)."""


def test_lightning_loads_every_checkpoint_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, tmp_path / "plain.ckpt")
    assert io.load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 4
    torch.save({"state_dict": {}, "extra": Payload()}, tmp_path / "object.ckpt")
    for asked in (None, False):  # what Lightning passes when weights_only is not set, and an explicit False
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            io.load_checkpoint(tmp_path / "object.ckpt", weights_only=asked)
