"""Decoding speed: llmtrain's generate against transformers' GPT2LMHeadModel.generate on the same weights.

    python benchmarks/generate.py                     # GPT-2 124M (random weights), 32-token prompt, 128 new tokens
    python benchmarks/generate.py --repeats 5 --skip-cli

A script that prints figures, not a test. Both sides read the same random GPT-2 124M weights, saved once with
transformers' save_pretrained (llmtrain reads the folder as it reads any GPT-2 checkpoint), decode greedily
with a KV cache at batch 1, and run alternately so that drift of the machine falls on both.

1. API level (one process): `GPT.generate` in fp32 and int8 weight-only against `GPT2LMHeadModel.generate` in
   fp32: tokens/s over the new tokens (prefill included), median of --repeats; the fp32 tokens must equal
   transformers' token for token.
2. Command line: each tool as a user runs it, with its defaults: `python -m llmtrain.generate ckpt_path=<dir>
   prompt=...` and a script that loads GPT2LMHeadModel.from_pretrained(<dir>) and calls generate. The decode
   rate is 256 / (time of a 257-token run - time of a 1-token run), so that start-up and loading drop out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north "
          "met fishermen from the coast and")  # 24 words: 32 GPT-2 tokens after --prompt-tokens cropping
HF_SCRIPT = """
import sys, torch, transformers
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=int(sys.argv[2]))
print(out.shape[1] - ids.shape[1])
"""


def save_weights(folder: Path, seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder, safe_serialization=True)


def prompt_ids(n: int) -> list[int]:
    from llmtrain.data.tokenizer import build_tokenizer

    ids = build_tokenizer("gpt2").encode_ordinary(PROMPT * 4)
    return ids[:n]


def api_level(folder: Path, ids: list[int], new_tokens: int, repeats: int) -> None:
    import copy

    import torch
    import transformers

    from llmtrain.interop.pretrained import load_pretrained
    from llmtrain.run.decoding import quantize_int8

    ours, _ = load_pretrained(str(folder))
    ours_int8 = quantize_int8(copy.deepcopy(ours))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    x = torch.tensor([ids])

    def run_ours(model):
        return model.generate(x, new_tokens, temperature=0)[0, len(ids):].tolist()

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(x, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                   pad_token_id=50256)[0, len(ids):].tolist()

    cases = {"llmtrain fp32": lambda: run_ours(ours), "transformers fp32": run_theirs,
             "llmtrain int8": lambda: run_ours(ours_int8)}
    for fn in cases.values():  # warm-up: allocator, kernels, caches
        fn()
    rates: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, list[int]] = {}
    for i in range(repeats):
        order = list(cases) if i % 2 == 0 else list(reversed(cases))
        for name in order:
            t = time.perf_counter()
            tokens[name] = cases[name]()
            rates[name].append(new_tokens / (time.perf_counter() - t))
    print(f"API level: greedy, batch 1, {len(ids)}-token prompt, {new_tokens} new tokens, median of {repeats}")
    for name, r in rates.items():
        print(f"  {name:<18} {statistics.median(r):8.1f} tokens/s  (min {min(r):.1f}, max {max(r):.1f})")
    base = statistics.median(rates["transformers fp32"])
    print(f"  llmtrain fp32 / transformers: {statistics.median(rates['llmtrain fp32']) / base:.2f}x, "
          f"llmtrain int8 / transformers: {statistics.median(rates['llmtrain int8']) / base:.2f}x")
    same = tokens["llmtrain fp32"] == tokens["transformers fp32"]
    agree = sum(a == b for a, b in zip(tokens["llmtrain int8"], tokens["llmtrain fp32"]))
    print(f"  fp32 tokens identical to transformers': {same}; int8 agrees with fp32 on {agree}/{new_tokens}")
    if not same:
        raise SystemExit("the fp32 tokens differ from transformers': the comparison is void")


def timed(cmd: list[str], expect_count: int | None = None) -> float:
    t = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed: {result.stderr[-2000:]}")
    if expect_count is not None and result.stdout.split()[-1] != str(expect_count):
        raise SystemExit(f"transformers generated {result.stdout.split()[-1]} tokens, not {expect_count}")
    return elapsed


def cli_level(folder: Path, ids: list[int], repeats: int) -> None:
    from llmtrain.data.tokenizer import build_tokenizer

    text = build_tokenizer("gpt2").decode(ids)
    ours = lambda n: [sys.executable, "-m", "llmtrain.generate", f"ckpt_path={folder}", f"prompt={text}",  # noqa: E731
                      f"max_new_tokens={n}"]
    theirs = lambda n: [sys.executable, "-c", HF_SCRIPT, str(folder), str(n), ",".join(map(str, ids))]  # noqa: E731
    times: dict[str, dict[int, list[float]]] = {"llmtrain": {1: [], 257: []}, "transformers": {1: [], 257: []}}
    for i in range(repeats):
        for name in (("llmtrain", "transformers") if i % 2 == 0 else ("transformers", "llmtrain")):
            for n in (1, 257):
                cmd = ours(n) if name == "llmtrain" else theirs(n)
                times[name][n].append(timed(cmd, None if name == "llmtrain" else n))
    print(f"Command line with each tool's defaults: decode rate = 256 / (t(257 tokens) - t(1 token)), "
          f"median of {repeats}")
    rates = {}
    for name, t in times.items():
        t1, t257 = statistics.median(t[1]), statistics.median(t[257])
        rates[name] = 256 / (t257 - t1)
        print(f"  {name:<13} 1 token {t1:5.2f} s, 257 tokens {t257:5.2f} s: {rates[name]:6.1f} tokens/s")
    print(f"  llmtrain / transformers: {rates['llmtrain'] / rates['transformers']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-cli", action="store_true", help="only the API-level comparison")
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        folder = Path(tmp) / "gpt2-random"
        save_weights(folder, args.seed)
        ids = prompt_ids(args.prompt_tokens)
        api_level(folder, ids, args.new_tokens, args.repeats)
        if not args.skip_cli:
            cli_level(folder, ids, args.repeats)


if __name__ == "__main__":
    main()
