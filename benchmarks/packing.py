"""Packing against padding: non-padding tokens/s, and the wall time to the same val/loss, for chat and instruct data.

    python benchmarks/packing.py                       # both data sets, 2 alternating pairs each (~12 min on 2 cores)
    python benchmarks/packing.py --only chat --repeats 1 --steps 40

A script that prints figures, not a test. Each run is a real `python -m llmtrain` process fine-tuning the tiny GPT
from scratch (`model=gpt_tiny`, the GPT-2 tokenizer, the same seed) with `data.packing=false` and then `true`, in
alternating order. Both sides train `--steps` optimizer steps of `data.batch_size` rows and validate every
`--val-every` steps on the same held-out records (packed or not, the validation loss is over the same response
tokens). Per side it reports:
- non-padding tokens/s: the run's own figure (the tokens that are not padding, over the steps after the first,
  validation included), as its last lines print it;
- time to the padded run's final val/loss: the wall time from the command's start to the first validation whose
  val/loss is at or below what the padded run ends with (read from the run's TensorBoard events, whose records
  carry their wall time); the padded side's own figure is the time of its last validation.

The data sets:
- `chat`: the shipped conversations (`finetune=chat data=chat_embedded`, ChatML), context 256;
- `alpaca`: Alpaca-shaped records written to a JSON file first: instruction, an input on 40% of them, and an
  output of log-normally distributed length (median ~60 tokens, a long tail cut at the context), their words
  taken from the shipped corpus, in Alpaca's prompt template (`finetune=instruct`), context 512.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = ROOT / "llmtrain" / "assets" / "data" / "entries.jsonl.gz"


def alpaca_shaped(path: Path, n: int, seed: int = 0) -> None:
    """n Alpaca-format records of Alpaca-like lengths, their words drawn from the shipped corpus."""
    rng = random.Random(seed)
    with gzip.open(ENTRIES, "rt") as f:
        entries = [json.loads(line) for line in f]
    words = [w for e in entries for w in e["text"].split()]

    def span(median: float, sigma: float) -> str:
        k = max(1, min(400, round(math.exp(rng.gauss(math.log(median), sigma)))))
        start = rng.randrange(len(words) - k)
        return " ".join(words[start:start + k])

    records = []
    for _ in range(n):
        term = rng.choice(entries)["term"]
        records.append({"instruction": f"Explain \"{term}\" and {span(6, 0.5)}",
                        "input": span(12, 0.8) if rng.random() < 0.4 else "",
                        "output": span(45, 0.9)})
    path.write_text(json.dumps(records))


def overrides(data: str, alpaca_file: Path) -> list[str]:
    if data == "chat":
        return ["finetune=chat", "data=chat_embedded", "data.chat_template=chatml", "model.context_length=256",
                "data.max_length=256"]
    return ["finetune=instruct", "data=instruct_embedded", "data.source=json", f"data.path={alpaca_file}",
            "model.context_length=512", "data.max_length=512"]


def run(data: str, packing: bool, args, alpaca_file: Path, work: Path) -> dict:
    run_dir = work / f"{data}-{'packed' if packing else 'padded'}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "llmtrain", "model=gpt_tiny", "data.tokenizer=gpt2", "init_from=null",
           *overrides(data, alpaca_file), f"data.packing={str(packing).lower()}", f"trainer.max_steps={args.steps}",
           f"trainer.val_check_interval={args.val_every}", f"data.batch_size={args.batch_size}",
           "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}", *args.overrides]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rate = next(float(ln.split()[1].replace(",", "")) for ln in out.stdout.splitlines() + out.stderr.splitlines()
                if ln.startswith("throughput:"))
    return {"wall": wall, "rate": rate, "val": val_losses(run_dir, start)}


def val_losses(run_dir: Path, start: float) -> list[tuple[int, float, float]]:
    """(step, val/loss, seconds since the command started) of every validation, from the TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "val/loss" in acc.Tags()["scalars"]:
            found += [(e.step, e.value, e.wall_time - start) for e in acc.Scalars("val/loss")]
    if not found:
        raise SystemExit(f"no val/loss in {run_dir}")
    return sorted(found)


def time_to(vals: list[tuple[int, float, float]], target: float) -> float | None:
    return next((t for _, loss, t in vals if loss <= target + 1e-6), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=["chat", "alpaca"], default=["chat", "alpaca"])
    p.add_argument("--repeats", type=int, default=2, help="alternating pairs per data set")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records", type=int, default=3000, help="Alpaca-shaped records written")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for both sides")
    args = p.parse_args()
    print(f"{cpu_name()}; {args.steps} steps of {args.batch_size} rows, validation every {args.val_every}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        alpaca_file = work / "alpaca_shaped.json"
        alpaca_shaped(alpaca_file, args.records)
        for data in args.only:
            results: dict[bool, list[dict]] = {False: [], True: []}
            for i in range(args.repeats):
                for packing in ((False, True) if i % 2 == 0 else (True, False)):
                    results[packing].append(run(data, packing, args, alpaca_file, work))
            report(data, results)


def report(data: str, results: dict[bool, list[dict]]) -> None:
    target = statistics.median(r["val"][-1][1] for r in results[False])
    print(f"\n{data}: target val/loss {target:.4f} (the padded runs' final, median)")
    print(f"  {'':8s} {'tokens/s (runs)':28s} {'time to target (runs)':30s} {'final val/loss':14s} wall")
    for packing, name in ((False, "padded"), (True, "packed")):
        rs = results[packing]
        rates = [r["rate"] for r in rs]
        times = [time_to(r["val"], target) for r in rs]
        shown = ", ".join("not reached" if t is None else f"{t:.1f}" for t in times)
        reached = [t for t in times if t is not None]
        median_time = f"{statistics.median(reached):.1f} s" if len(reached) == len(times) else "—"
        print(f"  {name:8s} {statistics.median(rates):8,.0f} ({', '.join(f'{x:,.0f}' for x in rates)}){'':4s}"
              f"{median_time:>8s} ({shown}){'':4s}{statistics.median(r['val'][-1][1] for r in rs):.4f}"
              f"{'':8s}{statistics.median(r['wall'] for r in rs):.1f} s")


if __name__ == "__main__":
    main()
