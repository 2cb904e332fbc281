"""Where one training step's time goes, llmtrain against nanoGPT, op by op (torch.profiler).

    python benchmarks/step_profile.py --nanogpt PATH/TO/nanoGPT                 # bf16 autocast (the default)
    python benchmarks/step_profile.py --nanogpt PATH --precision fp32 --steps 5 --top 30

A script that prints figures, not a test. Both sides train vs_nanogpt.py's shape (width 384, 6 layers, context 256,
batch 8, tied head, AdamW, clipping at 1.0) on the CPU. llmtrain runs its whole recipe (`python -m llmtrain`'s config,
Lightning loop and callbacks) with a callback that profiles training steps after --warmup; nanoGPT runs its model.py
and configure_optimizers() in the loop of its train.py (autocast, backward, clip, step, zero_grad). Each side runs
in its own process. Printed: each side's wall time per step inside the profiler, then the ops whose self time per
step differs most between the two (aten ops, and llmtrain's and nanoGPT's own record_function ranges), with
their calls per step. Profiling adds its own overhead to both sides alike; compare the rows, and take speeds from
vs_nanogpt.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for path in (BENCH_DIR, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from machine import cpu_name  # noqa: E402
from throughput import _CallbackBase  # noqa: E402  (Lightning's Callback, as StepTimer's)
from vs_nanogpt import LLMTRAIN_SHAPE, SHAPE  # noqa: E402


def op_table(prof, steps: int) -> dict:
    """{op name: [self CPU ms per step, calls per step]} from a finished profiler."""
    return {e.key: [e.self_cpu_time_total / 1000 / steps, e.count / steps] for e in prof.key_averages()}


class ProfileSteps(_CallbackBase):
    """A Lightning callback: profile training batches warmup .. warmup + steps - 1 and keep the op table."""

    result: dict = {}

    def __init__(self, warmup: int = 3, steps: int = 3) -> None:
        self.warmup, self.steps, self.prof, self.t0 = warmup, steps, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            import torch

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and batch_idx == self.warmup + self.steps - 1:
            wall = (time.perf_counter() - self.t0) * 1000 / self.steps
            self.prof.stop()
            ProfileSteps.result = {"wall_ms": wall, "ops": op_table(self.prof, self.steps)}
            self.prof = None


def llmtrain_worker(precision: str, warmup: int, steps: int) -> dict:
    import io
    from contextlib import redirect_stdout

    from hydra import compose, initialize_config_dir
    from step_profile import ProfileSteps as Callback  # the module Hydra imports the callback from, not __main__

    from llmtrain.cli import CONF_DIR
    from llmtrain.run.train import train

    with tempfile.TemporaryDirectory(prefix="profile-llmtrain-") as run_dir:
        overrides = [*LLMTRAIN_SHAPE, "optimizer=adamw", f"trainer.precision={precision}",
                     f"trainer.max_steps={warmup + steps}", f"trainer.val_check_interval={warmup + steps + 1000}",
                     "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "callbacks.progress_bar=null",
                     "+callbacks.prof._target_=step_profile.ProfileSteps", f"+callbacks.prof.warmup={warmup}",
                     f"+callbacks.prof.steps={steps}", f"run_dir={run_dir}"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with redirect_stdout(io.StringIO()):
            train(cfg)
    return Callback.result


def nanogpt_worker(nanogpt: Path, precision: str, warmup: int, steps: int) -> dict:
    """nanoGPT's train.py loop, reduced to what a step does on one CPU (no eval, no logging)."""
    from contextlib import nullcontext

    import torch

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig

    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=SHAPE["block_size"], vocab_size=50304, n_layer=SHAPE["n_layer"],
                          n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], dropout=0.0, bias=True))
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    x = torch.randint(0, 50257, (SHAPE["batch_size"], SHAPE["block_size"]))
    y = torch.randint(0, 50257, (SHAPE["batch_size"], SHAPE["block_size"]))

    def step() -> None:
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) * 1000 / steps
    return {"wall_ms": wall, "ops": op_table(prof, steps)}


def run_side(side: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--precision", args.precision,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.nanogpt:
        cmd += ["--nanogpt", str(args.nanogpt)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROFILE ")]
    if out.returncode or not lines:
        raise SystemExit(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROFILE "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--worker", choices=["llmtrain", "nanogpt"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "llmtrain":
        precision = {"fp32": "32-true", "bf16": "bf16-mixed"}[args.precision]
        print("PROFILE " + json.dumps(llmtrain_worker(precision, args.warmup, args.steps)))
        return
    if args.worker == "nanogpt":
        print("PROFILE " + json.dumps(nanogpt_worker(args.nanogpt, args.precision, args.warmup, args.steps)))
        return
    if args.nanogpt is None or not (args.nanogpt / "model.py").is_file():
        p.error("--nanogpt must point at a checkout of karpathy/nanoGPT (with model.py)")
    ours, theirs = run_side("llmtrain", args), run_side("nanogpt", args)
    print(f"{cpu_name()}; {args.precision}; {args.steps} profiled steps after {args.warmup}")
    print(f"  wall time per step inside the profiler: llmtrain {ours['wall_ms']:.1f} ms, "
          f"nanoGPT {theirs['wall_ms']:.1f} ms")
    for name, side in (("llmtrain", ours), ("nanoGPT", theirs)):
        aten = sum(ms for op, (ms, _) in side["ops"].items() if op.startswith("aten::"))
        print(f"  {name}: self time in aten ops {aten:.1f} ms per step, in all ops "
              f"{sum(ms for ms, _ in side['ops'].values()):.1f} ms")
    names = set(ours["ops"]) | set(theirs["ops"])
    zero = [0.0, 0.0]
    rows = sorted(names, key=lambda n: -abs(ours["ops"].get(n, zero)[0] - theirs["ops"].get(n, zero)[0]))
    print(f"  {'op (self CPU time per step)':44s} {'llmtrain ms':>12s} {'calls':>7s} {'nanoGPT ms':>11s} "
          f"{'calls':>7s} {'difference':>11s}")
    for n in rows[: args.top]:
        a, b = ours["ops"].get(n, zero), theirs["ops"].get(n, zero)
        print(f"  {n[:44]:44s} {a[0]:12.2f} {a[1]:7.1f} {b[0]:11.2f} {b[1]:7.1f} {a[0] - b[0]:+11.2f}")


if __name__ == "__main__":
    main()
