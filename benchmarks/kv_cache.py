"""The KV cache: how much it speeds up generation, and how much memory grouped-query attention saves in it.

    python benchmarks/kv_cache.py                           # gpt_tiny (ctx 256): greedy with vs without the cache
    python benchmarks/kv_cache.py --model gpt124m --device cuda
    python benchmarks/kv_cache.py --model llama_tiny --kv-heads 4 2 1      # MHA vs GQA vs MQA: memory, decode speed
    python benchmarks/kv_cache.py --model smollm_135m --kv-heads 9 3 1 --batch-size 8

--model is any preset of conf/model (its context_length is lowered to --context). Part 1: without the cache every
new token re-reads the whole sequence (O(T^2) attention per token over the run); with it each step feeds one token
and attends to the stored keys and values. Both runs must produce identical tokens. Part 2 (--kv-heads): the same
shape with each number of key/value heads: the cache's size (exact, from its tensors: k and v of every layer,
batch x n_kv_heads x positions x head_dim) falls by n_heads / n_kv_heads, and the cached decode speed is timed.
Randomly initialised models are enough: neither cost depends on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from llmtrain.model.gpt import GPT, GPTConfig, KVCache

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "model"


def load_preset(name: str, context: int) -> GPTConfig:
    values = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    return GPTConfig(**(values | {"context_length": min(context, values["context_length"]), "drop_rate": 0.0}))


def time_generate(model: GPT, idx: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int
                  ) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` greedy runs after one warm-up, and the tokens produced."""
    out = model.generate(idx, new_tokens, temperature=0, use_cache=use_cache)  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        if idx.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(idx, new_tokens, temperature=0, use_cache=use_cache)
        if idx.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def cache_bytes(config: GPTConfig, batch_size: int, positions: int, dtype: torch.dtype) -> int:
    """The bytes of the KV cache that generate allocates for this many positions (built on the meta device)."""
    cache = KVCache(config, batch_size, positions, "meta", dtype)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def with_and_without_cache(config: GPTConfig, args) -> None:
    torch.manual_seed(0)
    model = GPT(config).to(args.device).eval()
    idx = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_tokens), device=args.device)  # (B, T)
    print(f"model {args.model} ({model.num_params() / 1e6:.1f}M params) on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; batch {args.batch_size}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens greedy, median of {args.repeats} after a warm-up")
    results = {}
    for use_cache in (False, True):
        seconds, out = time_generate(model, idx, args.new_tokens, use_cache, args.repeats)
        results[use_cache] = (seconds, out)
        label = "with KV cache" if use_cache else "no cache"
        print(f"  {label:14s} {seconds * 1000:9.1f} ms  {args.batch_size * args.new_tokens / seconds:9.1f} tokens/s")
    same = torch.equal(results[False][1], results[True][1])
    print(f"  speed-up {results[False][0] / results[True][0]:.2f}x; tokens identical: {same}")
    if not same:
        first = (results[False][1] != results[True][1]).nonzero()[0, 1].item()
        raise SystemExit(f"cached and uncached tokens differ from position {first}")


def kv_heads_table(config: GPTConfig, args) -> None:
    """Cache memory and cached decode speed for each number of key/value heads, the rest of the shape unchanged."""
    positions = args.prompt_tokens + args.new_tokens
    dtype = torch.float32
    print(f"\nKV cache by number of key/value heads: model {args.model} with n_heads {config.n_heads}, "
          f"{config.n_layers} layers, head_dim {config.head_dim}; batch {args.batch_size}, {positions} positions, "
          f"{str(dtype).removeprefix('torch.')}; decode: {args.new_tokens} new tokens with the cache, median of "
          f"{args.repeats}")
    print(f"  {'n_kv_heads':>10}  {'params':>8}  {'cache MiB':>10}  {'vs MHA':>7}  {'ms':>9}  {'tokens/s':>9}")
    mha = cache_bytes(replace(config, n_kv_heads=config.n_heads), args.batch_size, positions, dtype)
    for n_kv in args.kv_heads:
        variant = replace(config, n_kv_heads=n_kv)
        torch.manual_seed(0)
        model = GPT(variant).to(args.device).eval()
        idx = torch.randint(0, variant.vocab_size, (args.batch_size, args.prompt_tokens), device=args.device)
        seconds, _ = time_generate(model, idx, args.new_tokens, True, args.repeats)
        size = cache_bytes(variant, args.batch_size, positions, dtype)
        kind = "MHA" if n_kv == config.n_heads else "MQA" if n_kv == 1 else "GQA"
        print(f"  {f'{n_kv} ({kind})':>10}  {model.num_params() / 1e6:7.2f}M  {size / 2**20:10.2f}  "
              f"{mha / size:6.2f}x  {seconds * 1000:9.1f}  {args.batch_size * args.new_tokens / seconds:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_tiny", help="a preset of conf/model (default gpt_tiny)")
    parser.add_argument("--context", type=int, default=256, help="context_length (at most the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-heads", type=int, nargs="*", default=[],
                        help="numbers of key/value heads to compare (each must divide n_heads), e.g. 4 2 1")
    args = parser.parse_args()

    if not (PRESETS / f"{args.model}.yaml").is_file() or args.model == "checkpoint":
        parser.error(f"--model {args.model}: not a preset of conf/model")
    config = load_preset(args.model, args.context)
    if args.prompt_tokens + args.new_tokens > config.context_length:
        parser.error(f"--prompt-tokens + --new-tokens must fit the context ({config.context_length}), or the cache "
                     "is not used")
    for n_kv in args.kv_heads:
        try:
            replace(config, n_kv_heads=n_kv)
        except ValueError as e:
            parser.error(f"--kv-heads {n_kv}: {e}")
    with_and_without_cache(config, args)
    if args.kv_heads:
        kv_heads_table(config, args)


if __name__ == "__main__":
    main()
