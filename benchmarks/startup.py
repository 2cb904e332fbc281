"""Where the time before the first optimizer step goes: interpreter, imports, config, data, model, Trainer, step.

    python benchmarks/startup.py               # the default run (make train's config), 5 fresh processes each
    python benchmarks/startup.py --repeats 9 --importtime

A script that prints figures, not a test. Each figure is the median over --repeats fresh processes (the token
cache is built once first, as a second `make train` finds it):
- `python -c pass`, `import llmtrain.cli` (what a config error or --help pays) and `import llmtrain.run.train`
  (the recipe: Lightning, datasets, TensorBoard), each in its own process;
- the default run up to the end of its first optimizer step, with the recipe's steps stamped from inside:
  resolve_run, the data module (prepare + setup), the model, the Trainer, fit up to the first step's start, and
  the first step itself.
With --importtime, the heaviest imports of `import llmtrain.run.train` as `python -X importtime` reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = r"""
import json, os, sys, time, tempfile
stamps = {}
import psutil
start = psutil.Process().create_time()
def stamp(name):
    stamps.setdefault(name, time.time() - start)
import llmtrain.run.train as recipe
stamp("imports")
from hydra import compose, initialize_config_dir
from llmtrain.cli import CONF_DIR
import lightning as L

def wrap(name, fn):
    def timed(*args, **kwargs):
        out = fn(*args, **kwargs)
        stamp(name)
        return out
    return timed

class FirstStep(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        stamp("first step begins")

    def on_train_batch_end(self, trainer, *args):
        stamp("first optimizer step")
        raise SystemExit(0)

recipe.resolve_run = wrap("config checked", recipe.resolve_run)
recipe.start_model = wrap("model built", recipe.start_model)
recipe.build_trainer = wrap("Trainer built", recipe.build_trainer)
real_build = recipe.build
def build(node, **kwargs):
    out = real_build(node, **kwargs)
    if "context_length" in kwargs:  # the data module
        out.setup = wrap("data ready", out.setup)
    return out
recipe.build = build
with tempfile.TemporaryDirectory() as run_dir:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+callbacks.first._target_=__main__.FirstStep", f"run_dir={run_dir}",
                                            "callbacks.progress_bar=null", "eval=quick"])  # as make train
    stamp("config composed")
    try:
        recipe.train(cfg)
    except SystemExit:
        pass
print("STAMPS " + json.dumps(stamps))
"""


def seconds(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--importtime", action="store_true", help="also list the heaviest imports of the recipe")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "llmtrain", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                    f"hydra.run.dir={tempfile.mkdtemp()}"], check=True, cwd=ROOT, capture_output=True, env=env)
    probes = {"python -c pass": "pass", "import llmtrain.cli": "import llmtrain.cli",
              "import llmtrain.run.train": "import llmtrain.run.train"}
    times: dict[str, list[float]] = {name: [] for name in probes}
    phases: list[dict[str, float]] = []
    for _ in range(args.repeats):
        for name, code in probes.items():
            times[name].append(seconds([sys.executable, "-c", code]))
        out = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("STAMPS ")), None)
        if line is None:
            raise SystemExit(f"the worker failed: {out.stderr[-3000:]}")
        phases.append(json.loads(line[len("STAMPS "):]))
    print(f"median of {args.repeats} fresh processes each")
    for name, t in times.items():
        print(f"  {name:24s} {statistics.median(t):6.2f} s (wall, whole process)")
    previous = 0.0
    print("  the default run, seconds since the process started:")
    for name in phases[0]:
        at = statistics.median(ph[name] for ph in phases)
        print(f"    {name:22s} at {at:6.2f} s  (+{at - previous:5.2f})")
        previous = at
    if args.importtime:
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import llmtrain.run.train"], cwd=ROOT,
                             capture_output=True, text=True, env=env)
        rows = [ln.split("|") for ln in out.stderr.splitlines() if ln.startswith("import time:") and "|" in ln]
        rows = [(int(r[1]), r[2].rstrip()) for r in rows[1:] if r[1].strip().isdigit()]
        top = [r for r in sorted(rows, reverse=True) if r[1].strip().count(".") <= 1][:15]
        print("  heaviest top-level imports of llmtrain.run.train (cumulative):")
        for us, name in top:
            print(f"    {us / 1e6:6.2f} s {name.strip()}")


if __name__ == "__main__":
    main()
