"""Time to quality: today's default run against a candidate default, back to back, and which change buys what.

    python benchmarks/time_to_quality.py            # the candidate below, 2 alternating pairs (~7 min on 2 cores)
    python benchmarks/time_to_quality.py --pairs 3 --candidate model.tie_weights=false optimizer.embedding_lr=0.1
    python benchmarks/time_to_quality.py --ablate   # also: the candidate with each of its changes removed once

A script that prints figures, not a test. Each run is the whole command, `python -m llmtrain [overrides]` in a fresh
process with its own run dir (the token cache built once first), timed from start to exit; the sides alternate so
that a machine's drift falls on both. Per side: the median wall time (and each run's), the final val/loss and val/ppl
(the same held-out split and GPT-2 tokenizer on both sides, so the perplexities compare), and the run's tokens/s.
With --ablate, one run per removed change (val/ppl is deterministic for a config on one machine; its time is not
compared).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
CANDIDATE = ["model.tie_weights=false", "optimizer.embedding_lr=0.1"]  # the first sweep's best (docs/performance.md)
DONE = re.compile(r"done: (\d+) steps, val/loss ([\d.]+), val/ppl ([\d.]+)")
RATE = re.compile(r"throughput: ([\d,]+) tokens/s")


def run(overrides: list[str], work: Path) -> dict:
    run_dir = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "llmtrain", *overrides, "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    text = out.stdout + out.stderr
    done, rate = DONE.search(text), RATE.search(text)
    if out.returncode != 0 or done is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "loss": float(done[2]), "ppl": float(done[3]),
            "rate": float(rate[1].replace(",", "")) if rate else float("nan")}


def describe(name: str, runs: list[dict]) -> str:
    walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
    wall, loss, ppl, rate = (statistics.median(r[k] for r in runs) for k in ("wall", "loss", "ppl", "rate"))
    return f"  {name:10s} {wall:7.1f} s ({walls})   val/loss {loss:.4f}   val/ppl {ppl:8.2f}   {rate:7,.0f} tokens/s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidate", nargs="+", default=CANDIDATE, help="the overrides that make the candidate default")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--ablate", action="store_true", help="also run the candidate without each of its overrides")
    p.add_argument("--base", nargs="*", default=[], help="overrides for both sides (e.g. trainer.max_steps=50)")
    args = p.parse_args()
    print(f"{cpu_name()}; today's default against: {' '.join(args.candidate)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([*args.base, "trainer.max_steps=1", "trainer.limit_val_batches=1"], work)  # the token cache, once
        sides: dict[str, list[dict]] = {"default": [], "candidate": []}
        for i in range(args.pairs):
            for side in (("default", "candidate") if i % 2 == 0 else ("candidate", "default")):
                sides[side].append(run([*args.base, *(args.candidate if side == "candidate" else [])], work))
        print(describe("default", sides["default"]))
        print(describe("candidate", sides["candidate"]))
        ppl = [statistics.median(r["ppl"] for r in sides[s]) for s in ("default", "candidate")]
        wall = [statistics.median(r["wall"] for r in sides[s]) for s in ("default", "candidate")]
        print(f"  candidate / default: val/ppl {ppl[1] / ppl[0]:.3f}x, wall time {wall[1] / wall[0]:.3f}x")
        if args.ablate:
            print("ablation: the candidate with one change removed (one run each)")
            for removed in args.candidate:
                r = run([*args.base, *(o for o in args.candidate if o != removed)], work)
                print(f"  without {removed:40s} val/ppl {r['ppl']:8.2f} ({r['ppl'] / ppl[0]:.3f}x the default's)")


if __name__ == "__main__":
    main()
