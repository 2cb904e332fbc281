"""Twenty SIGKILLs at random moments of short runs, each followed by `ckpt_path=auto` (tests/faults.py): every
killed-and-resumed run ends with the weights of an uninterrupted one, and nothing else is touched or left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, subprocess_env

pytestmark = pytest.mark.slow

KILLS = 20
# dropout (the random state matters), accumulation windows of 2 micro-batches, a save every 2 optimizer steps, a
# validation in the middle; the tokens built in each run's own cache, so that kills can land while tokenizing
RUN = [*TINY, "data.max_documents=60", "model.drop_rate=0.1", "trainer.max_steps=12",
       "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=12", "trainer.limit_val_batches=4",
       "checkpoint_every=2", "trainer.precision=32-true", "finetune.sample_tokens=0"]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_twenty_kills_at_random_moments_end_in_the_uninterrupted_weights_and_touch_nothing_else(tmp_path):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)  # what a user keeps beside their runs
    (work / "notes" / "plan.md").write_text("lr sweep next\n")
    (work / "slurm-7.log").write_text("job 7 started\n")
    before = {**files_under(work / "notes"), "slurm-7.log": (work / "slurm-7.log").read_bytes()}

    out = subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), str(work), str(KILLS), "0", *RUN],
                         cwd=tmp_path, env=subprocess_env((ROOT / "tests",)), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert len(report["kills"]) == KILLS
    assert report["identical"] and all(report["identical"].values()), report  # bit for bit, every run dir
    assert any(k["phase"].startswith("training") for k in report["kills"]), report["kills"]
    after = {**files_under(work / "notes"), "slurm-7.log": (work / "slurm-7.log").read_bytes()}
    assert after == before
    runs = set(report["identical"])
    expected = {"notes", "slurm-7.log", "logs", "phase", "whole", "whole-cache"} | runs | {f"{r}-cache" for r in runs}
    assert {p.name for p in work.iterdir()} == expected
    left = [str(p.relative_to(work)) for r in ["whole", *runs] for p in (work / r).rglob("*")
            if ".tmp" in p.name or p.name.startswith(".building-")]
    left += [str(p.relative_to(work)) for r in ["whole", *runs] for p in (work / f"{r}-cache").iterdir()
             if p.name.startswith(".building-")]
    assert left == []  # no half-written checkpoint, export or token cache outlives the kill that cut it
