"""How much the KV cache speeds up generation: greedy decoding of the same prompt with and without it.

    python benchmarks/kv_cache.py                      # gpt_tiny shape (ctx 256), CPU or the GPU if there is one
    python benchmarks/kv_cache.py --model gpt124m --device cuda

Without the cache every new token re-reads the whole sequence (O(T^2) attention per token over the run); with
it each step feeds one token and attends to the stored keys and values. Both runs must produce identical tokens.
A randomly initialised model is enough: the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.model import GPT, GPTConfig

SHAPES = {
    "gpt_tiny": GPTConfig(vocab_size=50257, context_length=256, emb_dim=128, n_heads=4, n_layers=4, tie_weights=True),
    "gpt124m": GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True,
                         tie_weights=True),
}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt_tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = SHAPES[args.model]
    if args.prompt_tokens + args.new_tokens > config.context_length:
        parser.error(f"--prompt-tokens + --new-tokens must fit the context ({config.context_length}), or the cache "
                     "is not used")
    torch.manual_seed(0)
    model = GPT(config).to(args.device).eval()
    idx = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=args.device)  # (1, T)

    print(f"model {args.model} ({model.num_params() / 1e6:.1f}M params) on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"greedy, median of {args.repeats} after a warm-up")
    results = {}
    for use_cache in (False, True):
        seconds, out = time_generate(model, idx, args.new_tokens, use_cache, args.repeats)
        results[use_cache] = (seconds, out)
        label = "with KV cache" if use_cache else "no cache"
        print(f"  {label:14s} {seconds * 1000:9.1f} ms  {args.new_tokens / seconds:9.1f} tokens/s")
    same = torch.equal(results[False][1], results[True][1])
    print(f"  speed-up {results[False][0] / results[True][0]:.2f}x; tokens identical: {same}")
    if not same:
        first = (results[False][1] != results[True][1]).nonzero()[0, 1].item()
        raise SystemExit(f"cached and uncached tokens differ from position {first}")


if __name__ == "__main__":
    main()
