"""Special tokens added to a tokenizer: what a chat template writes and the vocabulary lacks (ChatML's
`<|im_start|>` and `<|im_end|>` for GPT-2's BPE or the byte tokenizer).

The tokens are part of the tokenizer's name (tokenizer.with_added), so checkpoints, token caches and exports that
record the name carry them; they take the ids after the base vocabulary's, in order, and are recognised in text
wherever special tokens are (`encode(..., allowed_special=...)`), never by `encode_ordinary`. The model's embedding
and head grow to match (GPT.grow_vocab).
"""

from __future__ import annotations

import copy

import tiktoken
from tokenizers import AddedToken, Tokenizer


def missing_tokens(tok, tokens: list[str]) -> list[str]:
    """The tokens among `tokens` that `tok` does not encode as one special id."""
    missing = []
    for token in tokens:
        ids = tok.encode(token, allowed_special="all")
        if len(ids) != 1 or tok.encode_ordinary(token) == ids:
            missing.append(token)
    return missing


def add_tokens(base, name: str, tokens: list[str]):
    """Tokenizer `base` with `tokens` added after its ids, known by `name` (a tiktoken Encoding for the built-in
    tokenizers; for a tokenizer.json, a copy whose two `tokenizers` objects hold the new tokens)."""
    first = base.n_vocab
    if isinstance(base, tiktoken.Encoding):
        specials = {**base._special_tokens, **{t: first + i for i, t in enumerate(tokens)}}
        return tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens=specials, explicit_n_vocab=first + len(tokens))
    tok = copy.copy(base)
    tok.name = name
    tok._special, tok._plain = (Tokenizer.from_str(base._special.to_str()), Tokenizer.from_str(base._plain.to_str()))
    tok._plain.encode_special_tokens = True
    for inner in (tok._special, tok._plain):
        inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.n_vocab = max(tok._special.get_vocab(with_added_tokens=True).values()) + 1
    return tok
