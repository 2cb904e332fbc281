"""llmtrain end to end against nanoGPT's train.py: the same GPT shape, the same tokens, the same machine.

    python benchmarks/vs_nanogpt.py --nanogpt PATH/TO/nanoGPT       # a checkout of karpathy/nanoGPT
    python benchmarks/vs_nanogpt.py --nanogpt PATH --steps 40 --repeats 5

A script that prints figures, not a test; nanoGPT is not part of llmtrain and is not shipped with it. Both
programs train a GPT of width 384, 6 layers, 6 heads, context 256, batch 8, tied head, biases, no dropout,
on the GPT-2 tokens of llmtrain's embedded corpus (llmtrain's token cache is written in nanoGPT's format,
uint16 train.bin/val.bin, into <nanoGPT>/data/llmtrain_embedded/). Each run is a fresh process, the programs
alternate, and the rate is tokens per second over the steps after --warmup (nanoGPT: its per-iteration
`time ...ms` lines; llmtrain: the same stamps from a callback, as benchmarks/throughput.py takes them).

Rows:
- fp32 at equal settings: no compile, AdamW, each program's vocabulary (nanoGPT pads 50,257 to 50,304) and its
  loss path (llmtrain: its default chunked head + loss; nanoGPT: the full logits);
- bf16 at equal settings: the same with bf16 autocast on both sides (llmtrain: trainer.precision=bf16-mixed;
  nanoGPT: --dtype=bfloat16 through a copy of its train.py, train_cpu_autocast.py, whose one change is to apply
  its autocast on a CPU too: train.py itself uses autocast only on CUDA). Meaningful where the CPU has native
  bf16 (avx512_bf16 or amx_bf16); the script says whether this one has;
- llmtrain's defaults (trainer.precision=auto: bf16 where the CPU has native bf16; pretraining's Muon) against
  nanoGPT's CPU recipe (fp32).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from model_options import cpu_name

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for path in (BENCH_DIR, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHAPE = {"n_embd": 384, "n_layer": 6, "n_head": 6, "block_size": 256, "batch_size": 8}
LLMTRAIN_SHAPE = ["model=gpt_tiny", "model.emb_dim=384", "model.n_layers=6", "model.n_heads=6",
                  "model.context_length=256", "model.qkv_bias=true", "model.tie_weights=true", "model.drop_rate=0.0",
                  "data.batch_size=8"]
DATASET = "llmtrain_embedded"


def prepare_tokens(nanogpt: Path) -> None:
    """llmtrain's cached GPT-2 tokens of the embedded corpus, copied where nanoGPT's train.py reads a dataset."""
    from hydra import compose, initialize_config_dir

    from llmtrain.cli import CONF_DIR
    from llmtrain.run.train import build

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=unused"])
    dm = build(cfg.data, context_length=SHAPE["block_size"], tokenizer="gpt2", seed=0)
    dm.prepare_data()
    assert dm.cache.meta["dtype"] == "uint16"
    target = nanogpt / "data" / DATASET
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        shutil.copyfile(dm.cache.dir / f"{split}.bin", target / f"{split}.bin")


CPU_AUTOCAST = "train_cpu_autocast.py"


def write_cpu_autocast_copy(nanogpt: Path) -> None:
    """nanoGPT's train.py with its autocast applied on a CPU too (the only line changed)."""
    source = (nanogpt / "train.py").read_text()
    cuda_only = "nullcontext() if device_type == 'cpu' else "
    if source.count(cuda_only) != 1:
        raise SystemExit(f"{nanogpt / 'train.py'}: its autocast line has changed; cannot run it in bf16 on a CPU")
    (nanogpt / CPU_AUTOCAST).write_text(source.replace(cuda_only, ""))


def run_nanogpt(nanogpt: Path, steps: int, warmup: int, dtype: str = "float32") -> float:
    script = "train.py" if dtype == "float32" else CPU_AUTOCAST
    args = [f"--{k}={v}" for k, v in SHAPE.items()] + [
        "--device=cpu", "--compile=False", f"--dtype={dtype}", f"--dataset={DATASET}", "--dropout=0.0", "--bias=True",
        "--gradient_accumulation_steps=1", f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--eval_iters=1",
        "--eval_interval=100000", "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False",
        f"--out_dir={tempfile.mkdtemp(prefix='nanogpt-out-')}"]
    result = subprocess.run([sys.executable, script, *args], cwd=nanogpt, capture_output=True, text=True)
    times = [float(ms) for ms in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", result.stdout, flags=re.M)]
    if result.returncode or len(times) < steps:
        raise SystemExit(f"nanoGPT's train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    return tokens * len(times[warmup:]) / (sum(times[warmup:]) / 1000)


def run_llmtrain(steps: int, warmup: int, precision: str, optimizer: str) -> float:
    """The whole stack (python -m llmtrain's config and recipe), stamped per step by throughput.py's StepTimer.
    optimizer: "adamw" (nanoGPT's) or "default" (the config's: Muon when pretraining)."""
    cmd = [sys.executable, str(BENCH_DIR / "vs_nanogpt.py"), "--llmtrain-worker", "--steps", str(steps),
           "--warmup", str(warmup), "--precision", precision, "--optimizer", optimizer]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"^RATE (\S+)$", result.stdout, flags=re.M)
    if result.returncode or not found:
        raise SystemExit(f"llmtrain failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return float(found.group(1))


def llmtrain_worker(steps: int, warmup: int, precision: str, optimizer: str) -> None:
    import io
    from contextlib import redirect_stdout

    from hydra import compose, initialize_config_dir
    from throughput import StepTimer, steady_rate

    from llmtrain.cli import CONF_DIR
    from llmtrain.run.train import train

    with tempfile.TemporaryDirectory(prefix="bench-llmtrain-") as run_dir:
        overrides = [*LLMTRAIN_SHAPE, f"trainer.precision={precision}", f"trainer.max_steps={steps}",
                     f"trainer.val_check_interval={steps + 1000}", "trainer.limit_val_batches=2",
                     "trainer.accelerator=cpu", "callbacks.progress_bar=null",
                     "+callbacks.bench._target_=throughput.StepTimer", f"run_dir={run_dir}",
                     *([f"optimizer={optimizer}"] if optimizer != "default" else [])]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with redirect_stdout(io.StringIO()):
            train(cfg)
    r = StepTimer.records
    print(f"RATE {steady_rate(r['ends'], r['tokens_per_step'], warmup)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", choices=["fp32", "bf16", "defaults"], help="a subset of the rows")
    p.add_argument("--llmtrain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llmtrain_worker:
        llmtrain_worker(args.steps, args.warmup, args.precision, args.optimizer)
        return
    if args.nanogpt is None or not (args.nanogpt / "train.py").is_file():
        p.error("--nanogpt must point at a checkout of karpathy/nanoGPT (with train.py)")
    prepare_tokens(args.nanogpt)
    write_cpu_autocast_copy(args.nanogpt)
    makers = {"nanoGPT fp32": lambda: run_nanogpt(args.nanogpt, args.steps, args.warmup),
              "llmtrain fp32": lambda: run_llmtrain(args.steps, args.warmup, "32-true", "adamw"),
              "nanoGPT bf16": lambda: run_nanogpt(args.nanogpt, args.steps, args.warmup, "bfloat16"),
              "llmtrain bf16": lambda: run_llmtrain(args.steps, args.warmup, "bf16-mixed", "adamw"),
              "llmtrain defaults": lambda: run_llmtrain(args.steps, args.warmup, "auto", "default")}
    if args.only:
        makers = {name: make for name, make in makers.items() if name.split()[-1] in args.only}
    runs: dict[str, list[float]] = {name: [] for name in makers}
    for i in range(args.repeats):
        for name in (list(makers) if i % 2 == 0 else list(makers)[::-1]):
            runs[name].append(makers[name]())
            print(f"  run {i + 1} {name:18s}: {runs[name][-1]:,.0f} tokens/s", flush=True)
    med = {name: statistics.median(r) for name, r in runs.items()}
    print(f"shape: width 384, 6 layers, 6 heads, context 256, batch 8; {args.steps} steps, first {args.warmup} "
          f"left out; median of {args.repeats}")
    for name, r in runs.items():
        print(f"  {name:18s} {med[name]:8,.0f} tokens/s (min {min(r):,.0f}, max {max(r):,.0f})")
    print(f"  CPU: {cpu_name()}")
    for dtype in ("fp32", "bf16"):
        if f"nanoGPT {dtype}" in med and f"llmtrain {dtype}" in med:
            print(f"  llmtrain / nanoGPT at equal settings ({dtype}, no compile): "
                  f"{med[f'llmtrain {dtype}'] / med[f'nanoGPT {dtype}']:.2f}x")
    if "nanoGPT fp32" in med and "llmtrain defaults" in med:
        print(f"  llmtrain's defaults / nanoGPT's CPU recipe: {med['llmtrain defaults'] / med['nanoGPT fp32']:.2f}x")


if __name__ == "__main__":
    main()
