"""Hugging Face tokenizer files for llmtrain's tokenizers: vocab.json, merges.txt and tokenizer_config.json (GPT-2's
layout), or one tokenizer.json (Llama's layout).

GPT-2's tokenizer is byte-level BPE (Radford et al., 2019, section 2.2): a regular expression splits the text
into pieces, and each piece's UTF-8 bytes are merged pairwise, lowest rank first. tiktoken, which llmtrain
tokenizes with, keeps only the rank of every merged byte string (`llmtrain/assets/gpt2.tiktoken`); Hugging
Face's files spell each byte as a printable character (the bytes-to-unicode map below) and list the merges in
order. The merges are recovered from the ranks: BPE on a token's own bytes, allowing only lower ranks, ends in
exactly two parts, and those are the merge that made the token. For GPT-2 this gives back the 50,000 merges it
was released with, so `AutoTokenizer.from_pretrained` gives tiktoken's ids (tests/data/test_hf_tokenizer.py).

- "gpt2": 50,257 ids, `<|endoftext|>` = 50256.
- "bytes": id = the byte's value and `<|endoftext|>` = 256, no merges: one token per byte, as llmtrain's byte
  tokenizer does. It loads as a GPT2Tokenizer too.
"""

from __future__ import annotations

import json
from functools import cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from llmtrain.data.tokenizer import (
    ENDOFTEXT,
    GPT2_PATTERN,
    TOKENIZER_FILE,
    build_tokenizer,
    byte_decoder,
    is_file_tokenizer,
    ranks_and_specials,
    split_added,
    tokenizer_path,
)

MERGES_HEADER = "#version: 0.2"  # the first line of GPT-2's merges.txt


@cache
def byte_chars() -> tuple[str, ...]:
    """The printable character that stands for each byte value (0..255) in vocab.json, merges.txt and a byte-level
    tokenizer.json: the inverse of tokenizer.byte_decoder (printable Latin-1 bytes stand for themselves, the 68
    others take the characters from U+0100 on, in byte order, so that no token is spelled with whitespace)."""
    chars = {b: c for c, b in byte_decoder().items()}
    return tuple(chars[b] for b in range(256))


def spell(token: bytes) -> str:
    return "".join(byte_chars()[b] for b in token)


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in rank order, that produce every multi-byte token of `ranks` (tiktoken's ranks)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # BPE restricted to the ranks below this token's: merge the lowest-ranked pair
            found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(found)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


@cache
def _vocab_and_merges(name: str) -> tuple[str, str]:
    """(vocab.json, merges.txt) texts of a tokenizer; computed once per process (GPT-2's take about a second)."""
    enc = build_tokenizer(name)
    ranks = enc._mergeable_ranks  # tiktoken's own table: bytes -> id (the rank is the id)
    vocab = {spell(token): rank for token, rank in ranks.items()} | {ENDOFTEXT: enc.eot_token}
    merges = [MERGES_HEADER, *(f"{spell(a)} {spell(b)}" for a, b in recover_merges(ranks))]
    return json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"


def tokenizer_files(name: str, context_length: int, pad: bool = False, chat_template: str | None = None
                    ) -> dict[str, str]:
    """file name -> text of the Hugging Face files of tokenizer `name`: GPT-2's vocab.json and merges.txt for gpt2
    and bytes; a tokenizer.json (a copy) for a tokenizer that is one.

    `pad` makes the end-of-text token the padding token too: a classifier needs one for batches (llmtrain pads its
    batches with it); a language model leaves it unset, as GPT-2 does, so that training code that drops padding
    from the loss keeps the end-of-text targets.
    """
    if is_file_tokenizer(name) or split_added(name)[1]:  # one tokenizer.json, holding any added tokens
        tok = build_tokenizer(name)
        eot_text = tok.decode([tok.eot_token])
        bos = getattr(tok, "bos_token", None)  # a tiktoken Encoding has none
        bos_text = eot_text if bos is None else tok.decode([bos])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
                  "bos_token": bos_text, "eos_token": eot_text, "pad_token": eot_text if pad else None,
                  "add_bos_token": getattr(tok, "add_bos", False)}
        config |= {"chat_template": chat_template} if chat_template else {}
        return {TOKENIZER_FILE: tokenizer_json(name), "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}
    vocab, merges = _vocab_and_merges(name)
    eot = build_tokenizer(name).eot_token
    special = {"content": ENDOFTEXT, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
               "special": True}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
              "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
              "pad_token": ENDOFTEXT if pad else None, "clean_up_tokenization_spaces": False, "errors": "replace",
              "added_tokens_decoder": {str(eot): special}}
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def tokenizer_json(name: str) -> str:
    """The tokenizer as the text of a Hugging Face tokenizer.json: a file tokenizer's own text, or for the built-in
    ones a byte-level BPE with their merges and pre-tokenisation pattern (the same ids as tiktoken gives); added
    special tokens (a chat template's) after the vocabulary, as build_tokenizer adds them."""
    base, added = split_added(name)
    if added:
        tok = Tokenizer.from_str(tokenizer_json(base))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        return tok.to_str(pretty=True)
    if is_file_tokenizer(name):
        return tokenizer_path(name).read_text()
    ranks, specials = ranks_and_specials(name)
    vocab = {spell(token): rank for token, rank in ranks.items()} | specials
    merges = [(spell(a), spell(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok.to_str(pretty=True)
