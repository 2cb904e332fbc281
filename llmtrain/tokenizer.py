"""Tokenizers, both tiktoken encodings, built offline.

- "gpt2": GPT-2's BPE (50,257 ids, <|endoftext|> = 50256) from the ranks shipped in llmtrain/assets
  (tiktoken.get_encoding("gpt2") would download them at first use).
- "bytes": one id per byte (256 ids) plus <|endoftext|> = 256, for tiny experiments.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from importlib import resources

import tiktoken

from llmtrain.errors import UserError

ENDOFTEXT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (as in tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TOKENIZERS = ("gpt2", "bytes")


def _load_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def build_tokenizer(name: str) -> tiktoken.Encoding:
    if name == "gpt2":
        data = resources.files("llmtrain.assets").joinpath("gpt2.tiktoken").read_bytes()
        if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
            raise UserError("llmtrain/assets/gpt2.tiktoken is damaged (sha256 mismatch): reinstall llmtrain")
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_load_ranks(data),
            special_tokens={ENDOFTEXT: 50256},
            explicit_n_vocab=50257,
        )
    if name == "bytes":
        return tiktoken.Encoding(
            name="bytes",
            pat_str=GPT2_PATTERN,
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={ENDOFTEXT: 256},
            explicit_n_vocab=257,
        )
    raise UserError(f"data.tokenizer={name!r} is not known: choose one of {', '.join(TOKENIZERS)}")
