"""Preemption under 2 CPU DDP ranks (real processes): SIGTERM inside an accumulation window and SIGUSR1 during
validation each save last.ckpt at a window end, SIGUSR1 requeues a SLURM job from rank zero only, and
ckpt_path=auto resumes to final weights bit-identical to an uninterrupted run; the same as two nodes on one
machine."""

import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, run_cli, subprocess_env

pytestmark = pytest.mark.slow

# 2 ranks, windows of 2 micro-batches, dropout (the random state matters), validation every 4 batches (after steps
# 2 and 4), 6 optimizer steps; saves only at the end unless a signal comes
RUN = [*TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accumulate_grad_batches=2",
       "model.drop_rate=0.1", "trainer.max_steps=6", "trainer.val_check_interval=4", "trainer.limit_val_batches=3",
       "checkpoint_every=100", "trainer.precision=32-true"]


def run(args: list[str], run_dir):
    result = run_cli([*RUN, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=400,
                     extra_paths=(ROOT / "tests",))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"step": ckpt["global_step"], **ckpt["state_dict"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run([], run_dir)
    return weights(run_dir)


def signal_at(name: str, batch: int, rank: int, validation: bool = False) -> list[str]:
    return ["+callbacks.signal._target_=signals.SignalAt", f"+callbacks.signal.signal_name={name}",
            f"+callbacks.signal.batch={batch}", f"+callbacks.signal.rank={rank}",
            f"+callbacks.signal.validation={str(validation).lower()}"]


def test_sigterm_in_a_window_and_sigusr1_in_validation_save_and_resume_bit_identical(tmp_path, uninterrupted,
                                                                                    monkeypatch):
    """SIGTERM to rank 1 at batch 4 (the first of the window 4-5): saved after batch 5, at step 3. Resumed, SIGUSR1
    to rank 0 during the validation after step 4 (as SLURM's --signal=USR1@90): saved when validation ends, the job
    requeued once by rank zero. Resumed again to the end: the weights equal the uninterrupted run's, bit for bit."""
    run_dir = tmp_path / "run"
    first = run(["ckpt_path=auto", *signal_at("SIGTERM", batch=4, rank=1)], run_dir)
    assert weights(run_dir)["step"] == 3
    assert f"stopped by SIGTERM at step 3; newest checkpoint: {run_dir}/checkpoints/last.ckpt" in first.stdout

    calls = tmp_path / "scontrol-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    second = run(["ckpt_path=auto", *signal_at("SIGUSR1", batch=6, rank=0, validation=True)], run_dir)
    monkeypatch.undo()
    assert weights(run_dir)["step"] == 4
    assert "stopped by SIGUSR1 at step 4" in second.stdout
    assert calls.read_text() == "requeue 4242\n"  # once: rank zero only
    assert "requeued SLURM job 4242" in second.stdout

    third = run(["ckpt_path=auto"], run_dir)
    assert "done: 6 steps" in third.stdout
    got = weights(run_dir)
    assert got.keys() == uninterrupted.keys() and got["step"] == 6
    differ = [k for k in got if not torch.equal(torch.as_tensor(got[k]), torch.as_tensor(uninterrupted[k]))]
    assert not differ, differ


def two_nodes(args: list[str], run_dir) -> list[str]:
    """One run as two nodes of one CPU rank each on this machine, as two launches of `python -m llmtrain` that
    differ only in NODE_RANK (MASTER_ADDR 127.0.0.1); both write to one run dir, as on a shared file system.
    Their stdouts, node 0 first."""
    cmd = [sys.executable, "-m", "llmtrain", *[a for a in RUN if not a.startswith("trainer.devices=")],
           "trainer.devices=1", "trainer.num_nodes=2", *args, f"hydra.run.dir={run_dir}"]
    with socket.socket() as s:  # a port free now, for node 0 to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**subprocess_env((ROOT / "tests",)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen(cmd, cwd=run_dir.parent, env={**env, "NODE_RANK": str(n)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=400)[0] for p in nodes]
    for n, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {n}: {out[-3000:]}"
    return outs


def test_two_nodes_on_one_machine_train_save_and_resume_bit_identical(tmp_path):
    """trainer.num_nodes=2 with NODE_RANK 0 and 1: the ranks find each other, node 0 alone owns the run dir and its
    final line, SIGTERM to the rank of node 1 saves at the window's end, and ckpt_path=auto resumes both nodes to
    the weights of an uninterrupted two-node run, bit for bit. (A one-node 2-rank run's weights differ from both
    in the last bits: the sums over ranks are taken in another order.)"""
    two_nodes([], tmp_path / "whole")
    whole = weights(tmp_path / "whole")
    run_dir = tmp_path / "run"
    first = two_nodes(["ckpt_path=auto", *signal_at("SIGTERM", batch=4, rank=1)], run_dir)
    assert weights(run_dir)["step"] == 3
    assert "stopped by SIGTERM at step 3" in first[0]
    second = two_nodes(["ckpt_path=auto"], run_dir)
    assert "done: 6 steps" in second[0] and "done:" not in second[1]  # one final line: the launch rank's
    got = weights(run_dir)
    assert got.keys() == whole.keys() and got["step"] == 6
    differ = [k for k in got if not torch.equal(torch.as_tensor(got[k]), torch.as_tensor(whole[k]))]
    assert not differ, differ
