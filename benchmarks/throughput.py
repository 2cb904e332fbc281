"""Training throughput of llmtrain's full stack against a minimal plain-PyTorch loop, on the same model and data.

    python benchmarks/throughput.py                      # defaults: gpt_tiny, batch 16 x 128, fp32, 20 steps, 3 repeats
    python benchmarks/throughput.py --steps 30 --repeats 5 --model 10m
    python benchmarks/throughput.py --device cuda --model gpt124m --precision bf16-mixed --compile

A script that prints figures, not a test. Each measured run is a fresh subprocess of this file (so peak memory
and start-up time belong to one run); the two paths alternate (A B, B A, ...) so that drift of the machine
falls on both. Both paths use the same GPT class (llmtrain.model.gpt), the same seed, the same cached GPT-2 BPE
tokens of the embedded corpus, batch and windows, AdamW over llmtrain.training.optim.param_groups, the schedule
llmtrain.training.optim.lr_factor and gradient clipping at 1.0 (llmtrain with optimizer=adamw, except in the row of its
defaults, where pretraining's default optimizer, Muon, runs).

- llmtrain: the real config composed with Hydra's compose API (as tests/conftest.py does), shrunk only where
  a benchmark must be: trainer.max_steps=N, no validation inside the timed steps, no progress bar. The
  TensorBoard logger, checkpointing, LR monitor and Throughput callbacks stay as in a real run. A StepTimer
  callback (defined here, added as +callbacks.bench) stamps every training batch.
- plain: a for loop over the same memory-mapped tokens.

Figures: tokens/s over the steady-state steps (the first --warmup steps left out), time to the end of the first
optimizer step, peak memory, MFU = tokens/s x flops_per_token / matmul peak, tokenization MB/s and the share of
a llmtrain step spent outside the training step (data fetch + loop bookkeeping).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:  # so that Hydra can import the StepTimer as throughput.StepTimer
    sys.path.insert(0, str(BENCH_DIR))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODELS = {  # --model: Hydra overrides of the model group
    "tiny": ["model=gpt_tiny"],  # 7.2M parameters: vocab 50257, ctx 128, emb 128, 4 layers, 4 heads, tied
    "10m": ["model=gpt_tiny", "model.emb_dim=192", "model.n_heads=4"],  # ~11.4M: emb 192, 4 layers
    "gpt124m": ["model=gpt124m"],  # GPT-2 124M (ctx 1024)
}
RESULT_TAG = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def compose_config(args: argparse.Namespace, run_dir: str, extra: list[str] = ()):
    """The real config from conf/, as the command line composes it, shrunk for a timed run."""
    from hydra import compose, initialize_config_dir

    from llmtrain.cli import CONF_DIR

    overrides = [
        *MODELS[args.model],
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps + 1000}",  # no validation inside the timed steps ...
        "trainer.limit_val_batches=2",  # ... and a short one after fit (train() reports the final val/loss)
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        "callbacks.progress_bar=null",
        "finetune.sample_tokens=8",
        f"seed={args.seed}",
        f"perf.compile={str(args.compile).lower()}",
        f"perf.loss_chunk={args.loss_chunk or 'null'}",
        *([f"optimizer={args.optimizer}"] if args.optimizer != "default" else []),  # the plain loop's AdamW
        *extra,
        f"run_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_age_s() -> float:
    """Seconds since this process started (psutil), or since this module was imported."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:
        return time.perf_counter() - _T_IMPORT


_T_IMPORT = time.perf_counter()


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def flops_per_token(model) -> tuple[float, int]:
    """6 N + 12 L d T (Chowdhery et al., 2022, appendix B; nanoGPT's estimate_mfu).

    N counts the matrices a token passes through: every block parameter, the final LayerNorm and the head
    (V x d, counted even when tied to the token embedding, because the head matmul is real work); the
    embedding lookups cost no FLOPs. 12 L d T is attention's QK^T and AV (forward + backward).
    """
    cfg = model.config
    n = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.ln_f.parameters())
    n += model.head.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length, n


def steady_rate(ends: list[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens/s from the end of step `warmup` to the end of the last step."""
    n = len(ends) - warmup
    return tokens_per_step * n / (ends[-1] - ends[warmup - 1])


# ---------------------------------------------------------------------------------------------------------
# (a) llmtrain's full stack
# ---------------------------------------------------------------------------------------------------------

try:
    import lightning as _L

    _CallbackBase = _L.Callback
except ImportError:  # the parent process only needs the class when a worker runs
    _CallbackBase = object


class StepTimer(_CallbackBase):
    """Stamps each training batch: start, end (after the optimizer step), for the benchmark worker."""

    records: dict = {}

    def __init__(self) -> None:
        StepTimer.records = self.r = {"starts": [], "ends": [], "first_step_age": None}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device.type)
        self.r["starts"].append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device.type)
        self.r["ends"].append(time.perf_counter())
        if self.r["first_step_age"] is None:
            self.r["first_step_age"] = process_age_s()
            self.r["tokens_per_step"] = batch["input_ids"].numel()

    def on_train_end(self, trainer, pl_module) -> None:
        # the DataLoader alone (num_workers as configured): its cost per batch, outside any training
        loader = trainer.datamodule.train_dataloader()
        it = iter(loader)
        next(it)
        times = []
        for _ in range(min(20, len(loader) - 1)):
            t = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t)
        self.r["loader_fetch_s"] = statistics.median(times)
        self.r["peak_rss_mb"] = peak_rss_mb()
        if pl_module.device.type == "cuda":
            import torch

            self.r["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20


def worker_llmtrain(args: argparse.Namespace) -> dict:
    import io
    from contextlib import redirect_stdout

    import lightning  # noqa: F401  (imported before the baseline, as the plain path does)
    from throughput import StepTimer as Timer  # the class Hydra instantiates (module `throughput`, not __main__)

    from llmtrain.run.train import train

    base_rss = rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench-llmtrain-") as run_dir:
        cfg = compose_config(args, run_dir, ["+callbacks.bench._target_=throughput.StepTimer"])
        out = io.StringIO()
        t_call = time.perf_counter()
        with redirect_stdout(out):
            val_loss = train(cfg)
        r = dict(Timer.records)
    starts, ends = r["starts"], r["ends"]
    # everything between the end of one training batch and the start of the next: fetching the next batch,
    # the LR scheduler step, logging and the loop's bookkeeping
    gaps = [s - e for e, s in zip(ends[args.warmup - 1 : -1], starts[args.warmup :])]
    steps = [e - ends[i - 1] for i, e in enumerate(ends) if i >= args.warmup]
    reported = re.search(r"throughput: ([\d,]+) tokens/s", out.getvalue())
    return {
        "tokens_per_s": steady_rate(ends, r["tokens_per_step"], args.warmup),
        "first_step_from_start_s": r["first_step_age"],
        "first_step_from_call_s": ends[0] - t_call,
        "peak_rss_mb": r["peak_rss_mb"],
        "base_rss_mb": base_rss,
        "cuda_peak_mb": r.get("cuda_peak_mb"),
        "gap_share": sum(gaps) / sum(steps),
        "loader_share": r["loader_fetch_s"] / statistics.median(steps),
        "step_s": statistics.median(steps),
        "val_loss": val_loss,
        "reported_tokens_per_s": float(reported.group(1).replace(",", "")) if reported else None,
    }


# ---------------------------------------------------------------------------------------------------------
# (b) the plain PyTorch loop
# ---------------------------------------------------------------------------------------------------------


def worker_plain(args: argparse.Namespace) -> dict:
    import contextlib

    import lightning  # noqa: F401  (llmtrain.training.module imports it anyway; same baseline as the llmtrain path)
    import numpy as np
    import torch
    import torch.nn.functional as F

    from llmtrain.model.gpt import GPT, GPTConfig
    from llmtrain.model.losses import chunked_lm_loss_sum
    from llmtrain.run.train import build
    from llmtrain.training.hardware import choose_precision
    from llmtrain.training.optim import lr_factor, param_groups

    base_rss = rss_mb()
    t_call = time.perf_counter()
    cfg = compose_config(args, tempfile.gettempdir())
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # as L.seed_everything in train(): the same initial weights
    model = GPT(GPTConfig(**cfg.model)).to(device)
    model.train()
    step_model = torch.compile(model) if args.compile else model

    T, B = model.config.context_length, cfg.data.batch_size
    dm = build(cfg.data, context_length=T, seed=args.seed)  # for its cache folder (built by the parent)
    tokens = np.memmap(dm.cache.dir / "train.bin", dtype=dm.cache.meta["dtype"], mode="r")
    n_windows = (len(tokens) - 1) // T  # the non-overlapping windows of llmtrain.data.tokens.TokenWindows
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(args.seed))

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[(i * B) % (n_windows - B) : (i * B) % (n_windows - B) + B].tolist()
        w = torch.from_numpy(np.stack([tokens[j * T : j * T + T + 1] for j in idx]).astype(np.int64))
        return w[:, :-1].to(device, non_blocking=True), w[:, 1:].to(device, non_blocking=True)

    o = cfg.optimizer
    optimizer = torch.optim.AdamW(param_groups(model), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)  # as llmtrain's optimizer.fused=null
    sched = cfg.scheduler
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, sched.warmup_steps, args.steps, sched.min_lr_ratio))
    precision = choose_precision(args.precision, "gpu" if args.device == "cuda" else "cpu")[0]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    hidden = torch.compile(model.hidden) if args.compile else model.hidden

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # logits (B, T, V) do not outlive the call
        with autocast:
            if args.loss_chunk:  # the same chunked head + loss as llmtrain's perf.loss_chunk
                return chunked_lm_loss_sum(hidden(x), model.head.weight, y, args.loss_chunk)[0] / y.numel()
            return F.cross_entropy(step_model(x).flatten(0, 1).float(), y.flatten())

    ends, phases, first_step_age = [], {"data": [], "forward": [], "backward": [], "optimizer": []}, None
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = batch(step)
        sync(args.device)
        t1 = time.perf_counter()
        loss = loss_of(x, y)
        sync(args.device)
        t2 = time.perf_counter()
        loss.backward()
        sync(args.device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        t4 = time.perf_counter()
        ends.append(t4)
        if first_step_age is None:
            first_step_age = process_age_s()
        if step >= args.warmup:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(dt)
    return {
        "tokens_per_s": steady_rate(ends, B * T, args.warmup),
        "first_step_from_start_s": first_step_age,
        "first_step_from_call_s": ends[0] - t_call,
        "peak_rss_mb": peak_rss_mb(),
        "base_rss_mb": base_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "phases_s": {k: statistics.median(v) for k, v in phases.items()},
        "step_s": statistics.median(b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :])),
        "final_loss": loss.item(),
    }


# ---------------------------------------------------------------------------------------------------------
# Machine figures: matmul peak and tokenization speed (in the parent process)
# ---------------------------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, device: str) -> float:
    """FLOP/s of square matmuls: the best size's median over several repeats."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    sizes = (2048, 4096, 8192) if device == "cuda" else (2048, 4096)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (and, on CUDA, the cuBLAS handle)
        times = []
        for _ in range(5 if n <= 2048 else 3):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def tokenization_mb_s(threads: int, repeats: int = 3) -> tuple[float, float, float]:
    """(median, min, max) MB/s of encode_ordinary_batch over the embedded corpus' documents."""
    from llmtrain.data.sources import embedded_path
    from llmtrain.data.tokenizer import build_tokenizer

    tok = build_tokenizer("gpt2")
    with gzip.open(embedded_path("entries.jsonl.gz"), "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok.encode_ordinary_batch(texts[:100], num_threads=threads)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        tok.encode_ordinary_batch(texts, num_threads=threads)
        rates.append(mb / (time.perf_counter() - t))
    return statistics.median(rates), min(rates), max(rates)


def ensure_token_cache(args: argparse.Namespace) -> None:
    """Tokenize the corpus once, before any timed run (train() would otherwise do it inside the first run)."""
    from llmtrain.run.train import build

    cfg = compose_config(args, tempfile.gettempdir())
    dm = build(cfg.data, context_length=cfg.model.context_length, seed=args.seed)
    dm.prepare_data()


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def run_worker(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--device", args.device, "--precision", args.precision, "--seed", str(args.seed),
           "--loss-chunk", str(args.loss_chunk), "--optimizer", args.optimizer]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{path} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path (default 3)")
    p.add_argument("--model", "--model-size", dest="model", choices=sorted(MODELS), default="tiny",
                   help="tiny: gpt_tiny, 7.2M (default); 10m: emb 192, ~11.4M; gpt124m: GPT-2 124M")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed", "auto"), default="32-true",
                   help="of the equal-settings pair (default 32-true); auto: bf16-mixed where the device has it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in the equal-settings pair (llmtrain via perf.compile)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="tokens per chunk of the head + loss in the equal-settings pair (0: plain, the default)")
    p.add_argument("--skip-best", action="store_true",
                   help="skip the rows of llmtrain's defaults and of the best settings (auto precision, compile, "
                        "chunked loss) for both paths")
    p.add_argument("--seed", type=int, default=1337)
    # llmtrain's optimizer: AdamW as the plain loop's, or "default" (the config's: Muon when pretraining) for the
    # row of llmtrain's defaults
    p.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    p.add_argument("--skip-machine", action="store_true", help="skip the matmul peak and tokenization figures")
    p.add_argument("--worker", choices=("llmtrain", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error(f"--steps must exceed --warmup + 1 ({args.warmup + 1})")

    if args.worker:
        result = (worker_llmtrain if args.worker == "llmtrain" else worker_plain)(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    import torch

    from llmtrain.model.gpt import GPT, GPTConfig

    cfg = compose_config(args, tempfile.gettempdir())
    model = GPT(GPTConfig(**cfg.model))
    fpt, n_flop_params = flops_per_token(model)
    T = model.config.context_length
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(f"model: {args.model} ({model.num_params() / 1e6:.2f}M parameters; vocab {model.config.vocab_size}, "
          f"ctx {T}, emb {model.config.emb_dim}, {model.config.n_layers} layers, {model.config.n_heads} heads, "
          f"tied {model.config.tie_weights}), batch {args.batch_size} x {T}, {args.precision}, {args.device}, "
          f"seed {args.seed}")
    print(f"run: {args.steps} steps per run, first {args.warmup} left out, {args.repeats} runs per path "
          f"(alternating order), each a fresh process")
    if args.compile:
        print("compile: both paths (llmtrain through perf.compile=true); the first steps include the compilation")
    print(f"flops/token = 6 N + 12 L d T = 6 x {n_flop_params / 1e6:.2f}M + 12 x {model.config.n_layers} x "
          f"{model.config.emb_dim} x {T} = {fpt / 1e6:.1f} MFLOP (N: blocks + final LN + head)")
    del model

    if not args.skip_machine:
        peaks = {d: matmul_peak(d, args.device) for d in ("fp32", "bf16")}
        print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
        for threads in (1, 2):
            med, lo, hi = tokenization_mb_s(threads)
            print(f"tokenization (gpt2 BPE, embedded corpus, {threads} thread{'s' * (threads > 1)}): "
                  f"{med:.2f} MB/s ({lo:.2f}–{hi:.2f})")
    ensure_token_cache(args)

    results: dict[str, list[dict]] = {"llmtrain": [], "plain": []}
    for i in range(args.repeats):
        for path in (("llmtrain", "plain") if i % 2 == 0 else ("plain", "llmtrain")):
            r = run_worker(path, args)
            results[path].append(r)
            print(f"  run {i + 1} {path:8s}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s'] * 1e3:.0f} ms",
                  flush=True)

    print()
    peak = None if args.skip_machine else peaks["bf16" if args.precision == "bf16-mixed" else "fp32"]
    for path, rs in results.items():
        rates = [r["tokens_per_s"] for r in rs]
        line = f"{path:8s}: {spread(rates)} tokens/s"
        if peak:
            line += f", MFU {spread([x * fpt / peak * 100 for x in rates], '{:.1f}')} %"
        line += (f"; first optimizer step {spread([r['first_step_from_start_s'] for r in rs], '{:.1f}')} s after "
                 f"process start, {spread([r['first_step_from_call_s'] for r in rs], '{:.1f}')} s after the call; "
                 f"peak RSS {spread([r['peak_rss_mb'] for r in rs])} MB "
                 f"(+{spread([r['peak_rss_mb'] - r['base_rss_mb'] for r in rs])} MB over the imports)")
        if args.device == "cuda":
            line += f"; CUDA peak allocated {spread([r['cuda_peak_mb'] for r in rs])} MB"
        print(line)
    lt = [r["tokens_per_s"] for r in results["llmtrain"]]
    pl = [r["tokens_per_s"] for r in results["plain"]]
    print(f"ratio llmtrain/plain: {statistics.median(lt) / statistics.median(pl):.3f} (medians; per repeat "
          f"{', '.join(f'{a / b:.3f}' for a, b in zip(lt, pl))})")
    reported = [r["reported_tokens_per_s"] for r in results["llmtrain"] if r["reported_tokens_per_s"]]
    if reported:
        print(f"llmtrain's own Throughput callback (all steps after the first): {spread(reported)} tokens/s")
    print(f"llmtrain time between training batches (data fetch, LR step, logging, loop): "
          f"{spread([r['gap_share'] * 100 for r in results['llmtrain']], '{:.2f}')} % of the step; "
          f"of it the DataLoader alone: {spread([r['loader_share'] * 100 for r in results['llmtrain']], '{:.3f}')} %")
    phases = {k: statistics.median(r["phases_s"][k] for r in results["plain"]) for k in results["plain"][0]["phases_s"]}
    total = sum(phases.values())
    print("plain step: " + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / total * 100:.0f} %)" for k, v in phases.items()))
    if not args.skip_best:
        best_rows(args, statistics.median(pl))


def best_rows(args: argparse.Namespace, plain_rate: float) -> None:
    """llmtrain with its own defaults, and both paths with the best settings: precision auto (bf16 where the
    device has it), torch.compile, the chunked head + loss."""
    from omegaconf import OmegaConf

    from llmtrain.cli import CONF_DIR
    from llmtrain.training.hardware import choose_precision

    chunk = OmegaConf.load(CONF_DIR / "config.yaml").perf.loss_chunk or 0
    precision, why = choose_precision("auto", "gpu" if args.device == "cuda" else "cpu")
    defaults = argparse.Namespace(**{**vars(args), "precision": "auto", "loss_chunk": chunk, "compile": False,
                                     "optimizer": "default"})
    best = argparse.Namespace(**{**vars(args), "precision": "auto", "loss_chunk": chunk, "compile": True})
    runs: dict[str, list[float]] = {"llmtrain defaults": [], "llmtrain best": [], "plain best": []}
    print(f"\nprecision auto here: {precision} ({why}); loss chunk {chunk} tokens")
    for i in range(args.repeats):
        order = [("llmtrain defaults", "llmtrain", defaults), ("llmtrain best", "llmtrain", best),
                 ("plain best", "plain", best)]
        for name, path, run_args in (order if i % 2 == 0 else order[::-1]):
            rate = run_worker(path, run_args)["tokens_per_s"]
            runs[name].append(rate)
            print(f"  run {i + 1} {name:17s}: {rate:,.0f} tokens/s", flush=True)
    med = {name: statistics.median(rates) for name, rates in runs.items()}
    print(f"llmtrain defaults ({precision}, loss chunk {chunk}, no compile, its default optimizer): "
          f"{spread(runs['llmtrain defaults'])} "
          f"tokens/s = {med['llmtrain defaults'] / plain_rate:.2f}x the plain loop at equal settings ({args.precision}"
          f"{', compile' if args.compile else ''}{f', loss chunk {args.loss_chunk}' if args.loss_chunk else ''})")
    print(f"best settings ({precision}, compile, loss chunk {chunk}): llmtrain {spread(runs['llmtrain best'])}, "
          f"plain {spread(runs['plain best'])} tokens/s, ratio {med['llmtrain best'] / med['plain best']:.3f}; "
          f"llmtrain best = {med['llmtrain best'] / plain_rate:.2f}x the plain loop at equal settings")


if __name__ == "__main__":
    main()
