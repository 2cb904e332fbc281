"""Ranks: which process a user started, waiting for local rank 0, and a DDP job inside a Hydra multirun."""

import os
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from llmtrain.errors import UserError
from llmtrain.run import distributed


@pytest.mark.parametrize("env, launch", [
    ({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # local rank 0 of the second node: a rank the launcher started
])
def test_the_launch_rank_is_local_rank_0_of_node_0(monkeypatch, env, launch):
    for key in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.is_launch_rank() is launch


def test_waiting_polls_until_ready_and_gives_up_after_the_timeout_with_one_line(monkeypatch):
    clock = iter(range(0, 10_000, 10))  # ten seconds pass per reading
    monkeypatch.setattr(distributed.time, "monotonic", lambda: 1e6 + next(clock))  # a machine up for days
    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)
    answers = iter([False, False, True])
    distributed.wait_for(lambda: next(answers), "the token cache", timeout_s=60)
    with pytest.raises(UserError, match="^gave up after 60 s waiting for the token cache from local rank 0$"):
        distributed.wait_for(lambda: False, "the token cache", timeout_s=60)


@pytest.fixture
def sweep_job(monkeypatch):
    """A job of a multirun as Hydra describes it, in the process the user started."""
    hc = OmegaConf.create({"overrides": {"task": ["optimizer.lr=0.001", "trainer.devices=2"]},
                           "run": {"dir": "outputs/runs/first"}, "runtime": {"output_dir": "/sweep/3"}})
    monkeypatch.setattr(distributed, "in_multirun", lambda: True)
    monkeypatch.setattr(distributed, "HydraConfig", SimpleNamespace(get=lambda: hc))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["llmtrain", "-m", "optimizer.lr=0.001,0.01", "trainer.devices=2"])
    return hc


def test_a_ddp_job_of_a_sweep_relaunches_its_ranks_as_one_run_and_restores_everything(sweep_job, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with distributed.ddp_job_of_a_sweep(world_size=2, num_nodes=1):
        assert sys.argv == ["llmtrain", "optimizer.lr=0.001", "trainer.devices=2", "hydra.mode=RUN"]
        assert sweep_job.run.dir == "/sweep/3"  # the ranks write into this job's folder
        os.environ["MASTER_PORT"] = "12910"  # what Lightning sets up for the job's group
    assert sys.argv == ["llmtrain", "-m", "optimizer.lr=0.001,0.01", "trainer.devices=2"]
    assert "MASTER_PORT" not in os.environ  # the next job launches its own ranks
    assert sweep_job.run.dir == "outputs/runs/first"


@pytest.mark.parametrize("world_size, num_nodes", [(1, 1), (2, 2)])
def test_one_device_or_several_nodes_leave_the_job_as_it_is(sweep_job, world_size, num_nodes):
    with distributed.ddp_job_of_a_sweep(world_size=world_size, num_nodes=num_nodes):
        assert sys.argv[1] == "-m" and sweep_job.run.dir == "outputs/runs/first"
