"""Time to quality: the earlier default run against today's, back to back, and which change buys what.

    python benchmarks/time_to_quality.py            # 2 alternating pairs (~7 min on 2 cores)
    python benchmarks/time_to_quality.py --ablate   # also: today's default with each change undone once (~8 min more)
    python benchmarks/time_to_quality.py --baseline model=gpt_tiny --candidate model=gpt_tiny optimizer.head_lr=0.03

A script that prints figures, not a test. Each run is the whole command, `python -m llmtrain [overrides]` in a fresh
process with its own run dir (the token cache built once first), timed from start to exit; the sides alternate so
that a machine's drift falls on both. Per side: the median wall time (and each run's), the final val/loss and val/ppl
(the same held-out split and GPT-2 tokenizer on both sides, so the perplexities compare), and the run's tokens/s.
With --ablate, one run per undone change (val/ppl is deterministic for a config on one machine; its time is not
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
# What changed from the earlier default to today's (conf/), each as (today's value, the earlier one): the earlier
# default is today's with every change undone. The tied gpt_tiny's token table trains at head_lr (MuonAdamW), so
# undoing the head's rate is what gives the earlier table's 3e-3.
CHANGES = [("model=gpt_tiny_untied", "model=gpt_tiny"),
           ("optimizer.embedding_lr=0.1", "optimizer.embedding_lr=3e-3"),
           ("optimizer.head_lr=1e-2", "optimizer.head_lr=3e-3"),
           ("scheduler.warmup_steps=10", "scheduler.warmup_steps=50"),
           ("trainer.max_steps=130", "trainer.max_steps=150")]
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
    p.add_argument("--baseline", nargs="*", default=[old for _, old in CHANGES],
                   help="the overrides that make the earlier default (default: every change undone)")
    p.add_argument("--candidate", nargs="*", default=[], help="the overrides of the other side (default: none, "
                   "today's default)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--ablate", action="store_true", help="also run today's default with each change undone once")
    p.add_argument("--base", nargs="*", default=[], help="overrides for both sides (e.g. trainer.max_steps=50)")
    args = p.parse_args()
    print(f"{cpu_name()}; {' '.join(args.baseline) or 'the default'} against "
          f"{' '.join(args.candidate) or 'the default'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([*args.base, "trainer.max_steps=1", "trainer.limit_val_batches=1"], work)  # the token cache, once
        sides: dict[str, list[dict]] = {"baseline": [], "candidate": []}
        for i in range(args.pairs):
            for side in (("baseline", "candidate") if i % 2 == 0 else ("candidate", "baseline")):
                sides[side].append(run([*args.base, *(args.candidate if side == "candidate" else args.baseline)],
                                       work))
        print(describe("baseline", sides["baseline"]))
        print(describe("candidate", sides["candidate"]))
        ppl = [statistics.median(r["ppl"] for r in sides[s]) for s in ("baseline", "candidate")]
        wall = [statistics.median(r["wall"] for r in sides[s]) for s in ("baseline", "candidate")]
        print(f"  candidate / baseline: val/ppl {ppl[1] / ppl[0]:.3f}x, wall time {wall[1] / wall[0]:.3f}x")
        if args.ablate:
            print("ablation: today's default with one change undone (one run each)")
            for new, old in CHANGES:
                r = run([*args.base, *args.candidate, old], work)
                print(f"  {old:30s} instead of {new:28s} val/ppl {r['ppl']:8.2f} "
                      f"({r['ppl'] / ppl[0]:.3f}x the baseline's)")


if __name__ == "__main__":
    main()
