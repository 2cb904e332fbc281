"""The model families side by side at one size: `make train`'s run (the shipped corpus, the GPT-2 tokenizer, Muon,
its steps and precision) from scratch with each architecture at ~7M parameters, in alternating rounds.

    python benchmarks/model_options.py                   # 3 rounds of the four variants below (~1 hour on 2 cores)
    python benchmarks/model_options.py --rounds 1 --extra trainer.max_steps=20    # a quick look

A script that prints figures, not a test. Each run is a fresh `python -m llmtrain` process in its own run dir
(removed afterwards); the token cache is built before the first round. Printed per variant: parameters, the final
val/loss and val/ppl (seeded: equal in every round, or the spread is printed), and the median of the rounds'
tokens/s (the run's own "throughput:" line: every step after the first, validation included), each round's in
brackets. The variants:
- gpt_tiny: GPT-2's architecture (learned positions, LayerNorm, GELU MLP, biases), as `make train`;
- llama_tiny: RoPE, grouped-query attention, RMSNorm, SwiGLU, no biases;
- qwen3-style: llama_tiny with QK-norm (RMSNorm over each head's queries and keys);
- qwen2-style: llama_tiny with biases on q, k and v.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "gpt_tiny": ["model=gpt_tiny"],
    "llama_tiny": ["model=llama_tiny"],
    "qwen3-style": ["model=llama_tiny", "model.qk_norm=true"],
    "qwen2-style": ["model=llama_tiny", "model.qkv_bias=true"],
}


def run(overrides: list[str], run_dir: Path) -> dict:
    """One training run: its final metrics, tokens/s and parameter count."""
    cmd = [sys.executable, "-m", "llmtrain", *overrides, "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{text[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rate = re.search(r"throughput: ([\d,]+) tokens/s", text)
    params = re.search(r"parameters: ([\d,]+)", text)
    return {"val/loss": metrics["val/loss"], "val/ppl": metrics["val/ppl"],
            "tokens/s": float(rate.group(1).replace(",", "")) if rate else float("nan"),
            "parameters": params.group(1) if params else "?"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the variants")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. trainer.max_steps=20")
    parser.add_argument("--keep", type=Path, help="keep the first round's run dirs in this folder (e.g. to evaluate)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="model-options-") as tmp:
        # the token cache, built once (make train's first run builds it; a second finds it)
        run([*VARIANTS[names[0]], *args.extra, "trainer.max_steps=1", "trainer.val_check_interval=1",
             "trainer.limit_val_batches=1"], Path(tmp) / "warm-up")
        for r in range(args.rounds):
            for name in names:  # alternating: round r runs every variant once, in the same order
                where = args.keep / name if args.keep and r == 0 else Path(tmp) / f"{name}-{r}"
                results[name].append(run([*VARIANTS[name], *args.extra], where))
                print(f"round {r + 1}/{args.rounds} {name}: {results[name][-1]}", file=sys.stderr)
    print(f"{cpu_name()}, torch {torch_version()}; {args.rounds} alternating rounds; overrides: "
          f"{' '.join(args.extra) or '(make train defaults)'}\n")
    print("| variant | overrides | parameters | val/loss | val/ppl | tokens/s (median; each round) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        rows = results[name]
        ppl = {round(x["val/ppl"], 1) for x in rows}
        rates = [x["tokens/s"] for x in rows]
        print(f"| {name} | `{' '.join(VARIANTS[name])}` | {rows[0]['parameters']} | {rows[0]['val/loss']:.3f} | "
              f"{' / '.join(f'{p:.1f}' for p in sorted(ppl))} | {statistics.median(rates):,.0f} "
              f"({', '.join(f'{x:,.0f}' for x in rates)}) |")


def torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
