"""Fault injection (tests/run/test_fault_injection.py): a short run killed with SIGKILL at random moments and
resumed with ckpt_path=auto each time, until it ends; again with a fresh run dir until `kills` kills have landed.

    python tests/faults.py WORK KILLS SEED OVERRIDE...

Each attempt is `python -m llmtrain OVERRIDE... ckpt_path=auto` as the command line runs it (Hydra's main, the run
dir, the recipe), in a process forked from this one once the heavy imports are done, so that an attempt costs
its own work and not seconds of imports. Its output goes to WORK/logs/. A first, uninterrupted run (WORK/whole)
gives the weights every killed-and-resumed run must end with and the duration the kill moments are drawn from
(then the quickest whole run of an attempt, as a first run pays for more than the later ones).
Prints one JSON line: each kill with its moment and what the run was doing then (from signals.Phase), and per run
dir whether its final weights equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

import llmtrain.cli
import llmtrain.run.train  # noqa: F401  (the recipe's imports, done once here rather than in every attempt)


def attempt(overrides: list[str], log: Path) -> int:
    """Fork `python -m llmtrain overrides`; its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = ["llmtrain", *overrides]
        try:
            llmtrain.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(code)


def wait(pid: int, kill_after: float | None) -> int | None:
    """Wait for the attempt; SIGKILL it after kill_after seconds if it still runs. Its exit status, or None if the
    kill landed."""
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"step": ckpt["global_step"], **ckpt["state_dict"]}


def main() -> None:
    work, kills, seed, overrides = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    phase = work / "phase"

    def run_args(run_dir: Path) -> list[str]:
        return [*overrides, "ckpt_path=auto", f"hydra.run.dir={run_dir}", f"data.cache_dir={run_dir}-cache",
                "+callbacks.phase._target_=signals.Phase", f"+callbacks.phase.path={phase}"]

    start = time.monotonic()
    code = wait(attempt(run_args(work / "whole"), logs / "whole.log"), None)
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed ({code}): {(logs / 'whole.log').read_text()[-3000:]}")
    duration = time.monotonic() - start
    whole = weights(work / "whole")

    rng = random.Random(seed)
    landed: list[dict] = []
    runs: dict[str, bool] = {}
    attempts = 0
    while len(landed) < kills:
        run_dir = work / f"run{len(runs)}"
        while True:  # kill and resume this run dir until an attempt ends by itself
            if attempts > 5 * kills:
                raise SystemExit(f"no end after {attempts} attempts: the kills come too early to make progress")
            phase.unlink(missing_ok=True)
            at = rng.uniform(0, duration) if len(landed) < kills else None
            log = logs / f"attempt{attempts}.log"
            began, fresh = time.monotonic(), not (run_dir / "checkpoints").exists()
            code = wait(attempt(run_args(run_dir), log), at)
            attempts += 1
            if code == 0 and fresh:  # a whole run from the start: the kill moments are drawn over the quickest
                duration = min(duration, time.monotonic() - began)
            if code is None:
                doing = phase.read_text() if phase.exists() else "starting (before training: config, tokens, model)"
                landed.append({"run": run_dir.name, "at_s": round(at, 2), "phase": doing})
                continue
            if code != 0:
                raise SystemExit(f"attempt {attempts - 1} in {run_dir.name} failed ({code}): {log.read_text()[-3000:]}")
            break
        got = weights(run_dir)
        runs[run_dir.name] = got.keys() == whole.keys() and all(
            torch.equal(torch.as_tensor(got[k]), torch.as_tensor(whole[k])) for k in got)
    print(json.dumps({"duration_s": round(duration, 2), "attempts": attempts, "kills": landed, "identical": runs}))


if __name__ == "__main__":
    main()
