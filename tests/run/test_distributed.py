"""Ranks: which process a user started, waiting for local rank 0, and a DDP job inside a Hydra multirun."""

import os
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from llmtrain.errors import UserError
from llmtrain.run import distributed

TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
SRUN = {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("env, ranks", [
    ({}, (0, 0)),  # the process a user started
    # Lightning's re-launch of the other ranks (trainer.devices=N), and a two-node run of it
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, (0, 0)), ({"LOCAL_RANK": "1"}, (-1, 1)),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, (-1, 0)),  # local rank 0 of the second node: not the launch rank
    ({"LOCAL_RANK": "0", "GROUP_RANK": "1"}, (-1, 0)),
    # torchrun on one node and on the second of two: RANK is the global rank, GROUP_RANK the node
    (TORCHRUN | {"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, (1, 1)),
    (TORCHRUN | {"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, (2, 0)),
    (TORCHRUN | {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, (0, 0)),
    # srun sets no RANK/LOCAL_RANK/NODE_RANK: every task read 0 before, and so believed it was rank 0
    (SRUN | {"SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, (2, 0)),
    (SRUN | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, (0, 0)),
    # one SLURM task (sbatch running python, or an interactive job) whose ranks Lightning re-launches: theirs
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "LOCAL_RANK": "1"}, (-1, 1)),
    (SRUN | {"SLURM_JOB_NAME": "interactive", "SLURM_PROCID": "0", "LOCAL_RANK": "1"}, (-1, 1)),
])
def test_ranks_are_read_as_lightnings_cluster_environments_read_them(env, ranks):
    assert distributed.launch_ranks(env) == ranks


def test_only_global_rank_0_is_the_launch_rank(monkeypatch):
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.is_launch_rank()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not distributed.is_launch_rank()


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
