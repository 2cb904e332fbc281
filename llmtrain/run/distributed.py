"""Ranks: which process this is, waiting for local rank 0, and DDP inside a Hydra multirun.

With `trainer.devices=N`, Lightning re-launches the other ranks as `python -m llmtrain <argv>`: each runs the
whole recipe (config checks, data, model) before it joins the group. Launchers that start all ranks themselves
(torchrun, SLURM) do the same. Only the process a user started prepares data and checks the run dir.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from llmtrain.errors import UserError


def world() -> tuple[int, int]:
    """(world size, rank) of the process group, or (1, 0) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def launch_ranks(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(global rank, local rank) of this process as its launcher numbered it, read from the environment in the
    order Lightning's cluster environments read it; (0, 0) for a process a user started.

    - torchrun (TORCHELASTIC_RUN_ID): RANK and LOCAL_RANK;
    - srun with more than one task (SLURM_NTASKS > 1, a job not named bash or interactive): SLURM_PROCID and
      SLURM_LOCALID (srun sets no RANK, LOCAL_RANK or NODE_RANK);
    - Lightning's own re-launch of the other ranks, and launchers like it: LOCAL_RANK, with NODE_RANK (or
      GROUP_RANK) on the nodes after the first; RANK where it is set. A global rank other than 0 is reported
      as -1 when only the node and local ranks are known."""
    env = os.environ if env is None else env

    def read(*names: str) -> int:
        return next((int(env[n]) for n in names if env.get(n, "") != ""), 0)

    if "TORCHELASTIC_RUN_ID" in env:
        return read("RANK"), read("LOCAL_RANK")
    if read("SLURM_NTASKS") > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return read("SLURM_PROCID"), read("SLURM_LOCALID")
    local = read("LOCAL_RANK")
    if env.get("RANK", "") != "":
        return read("RANK"), local
    return (0 if local == 0 and read("NODE_RANK", "GROUP_RANK") == 0 else -1), local


def is_launch_rank() -> bool:
    """True in the one process that prepares data and owns the run dir: global rank 0 (under srun, torchrun, or
    the process a user started before Lightning re-launched the other ranks)."""
    return launch_ranks()[0] == 0


def wait_for(ready: Callable[[], bool], what: str, timeout_s: float = 3 * 3600) -> None:
    """Poll until `ready()` (e.g. local rank 0's token cache exists), or give up with one line."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise UserError(f"gave up after {timeout_s:.0f} s waiting for {what} from local rank 0")
        time.sleep(0.5)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def ddp_job_of_a_sweep(world_size: int, num_nodes: int) -> Iterator[None]:
    """Let each job of a `-m` sweep run as its own DDP group in its own sweep subdir.

    Lightning re-launches the other ranks with the original command line (so each child would start a
    sweep of its own) and Hydra's run dir: give it this job's concrete overrides and output dir instead.
    Afterwards, end the job's process group and restore the environment Lightning set up for it
    (LOCAL_RANK, MASTER_PORT, ...), so that the next job launches its own ranks."""
    if world_size <= 1 or num_nodes > 1 or not in_multirun() or not is_launch_rank():
        yield
        return
    hc = HydraConfig.get()
    saved_argv, saved_env, saved_run_dir = sys.argv, dict(os.environ), hc.run.dir
    sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]  # a sweeper preset must not sweep again
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        with read_write(hc.run):
            hc.run.dir = saved_run_dir
