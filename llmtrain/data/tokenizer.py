"""Tokenizers, built offline, all with the methods of a tiktoken Encoding that the code calls (`encode_ordinary`,
`encode_ordinary_batch`, `encode`, `decode`, `decode_single_token_bytes`, `eot_token`, `n_vocab`); a tokenizer.json's
also has `bos_token`, the begin-of-text id its configs name (None where they name none), for exports, and `add_bos`:
whether every text starts with it (Llama's <s>, Llama 3's <|begin_of_text|>), as its post-processor says.

A tokenizer is named by a string, which checkpoints, exports and the token cache record:
- "gpt2": GPT-2's BPE (50,257 ids, <|endoftext|> = 50256) from the ranks shipped in llmtrain/assets
  (tiktoken.get_encoding("gpt2") would download them at first use).
- "bytes": one id per byte (256 ids) plus <|endoftext|> = 256, for tiny experiments.
- the path of a Hugging Face `tokenizer.json` (or of a folder holding one), e.g. a Llama or SmolLM model's, read
  with the `tokenizers` library. Its end-of-text id comes from the `tokenizer_config.json` or `config.json` beside
  it. A run copies such a file into its run dir and its exports, so that they do not depend on where it came from.

Any of them may carry added special tokens (a chat template's `<|im_start|>`, `<|im_end|>`): the name is then the
base name, ADDED and the tokens as a JSON list, e.g. 'gpt2 + ["<|im_start|>", "<|im_end|>"]'; they take the ids after
the vocabulary's, in that order (data/added_tokens.py).

hf_tokenizer.py writes any of them as Hugging Face tokenizer files, for exports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer, decoders

from llmtrain.data.added_tokens import add_tokens
from llmtrain.errors import UserError

ENDOFTEXT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (as in tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TOKENIZERS = ("gpt2", "bytes")
TOKENIZER_FILE = "tokenizer.json"
CHOOSE = f"one of {', '.join(TOKENIZERS)}, or the path of a {TOKENIZER_FILE}"
# end-of-text tokens of common tokenizer.json files, tried when no config beside the file names one
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
ADDED = " + "  # between a tokenizer's name and the JSON list of the special tokens added to it


def split_added(name: str) -> tuple[str, list[str]]:
    """(the base tokenizer's name, the tokens added to it) of a tokenizer name (see the module docstring)."""
    base, sep, tokens = name.rpartition(ADDED + "[")
    if not sep or not name.endswith("]"):
        return name, []
    return base, json.loads("[" + tokens)


def with_added(name: str, tokens: list[str]) -> str:
    """The name of tokenizer `name` with `tokens` added after the ones it already has (no tokens: name itself)."""
    base, before = split_added(name)
    tokens = [*before, *(t for t in tokens if t not in before)]
    return f"{base}{ADDED}{json.dumps(tokens, ensure_ascii=False)}" if tokens else base


def _load_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _gpt2_ranks() -> dict[bytes, int]:
    data = resources.files("llmtrain.assets").joinpath("gpt2.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise UserError("llmtrain/assets/gpt2.tiktoken is damaged (sha256 mismatch): reinstall llmtrain")
    return _load_ranks(data)


def ranks_and_specials(name: str) -> tuple[dict[bytes, int], dict[str, int]]:
    if name == "gpt2":
        return _gpt2_ranks(), {ENDOFTEXT: 50256}
    return {bytes([i]): i for i in range(256)}, {ENDOFTEXT: 256}


@cache
def build_tokenizer(name: str | None) -> tiktoken.Encoding | JSONTokenizer:
    """The tokenizer that `name` names (see the module docstring); an unknown name is a UserError."""
    if name is None:  # what a Hugging Face folder without tokenizer.json says
        raise UserError("the model comes without a tokenizer (no tokenizer.json beside its config.json): copy in the "
                        "tokenizer.json it was trained with")
    if (added := split_added(name))[1]:
        return add_tokens(build_tokenizer(added[0]), name, added[1])
    if name in TOKENIZERS:
        ranks, specials = ranks_and_specials(name)
        return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials,
                                 explicit_n_vocab=len(ranks) + len(specials))
    return JSONTokenizer(tokenizer_path(name))


def bos_prefix(tok) -> list[int]:
    """[begin-of-text id] for a tokenizer that starts every text with one (`add_bos`), else []: what goes before a
    document, a prompt or a record wherever llmtrain encodes one, so that it sees what the model was trained on."""
    return [tok.bos_token] if getattr(tok, "add_bos", False) else []


def with_bos(tok, ids: list[int]) -> list[int]:
    """ids with the tokenizer's begin-of-text id first (bos_prefix), once: ids starting with it are kept as is."""
    bos = bos_prefix(tok)
    return ids if ids[:len(bos)] == bos else bos + ids


def continuation_text(tok, ids: list[int]) -> str:
    """Generated ids as text: up to the first end-of-text id (which need not be the last id of the vocabulary, as
    GPT-2's is); ids past the tokenizer's vocabulary (a model vocabulary padded beyond it) dropped, not raising."""
    if tok.eot_token in ids:
        ids = ids[: ids.index(tok.eot_token)]
    return tok.decode([i for i in ids if i < tok.n_vocab])


def tokenizer_path(name: str | Path) -> Path:
    """The tokenizer.json that name points at (the file, or a folder holding it), absolute."""
    path = Path(split_added(str(name))[0]).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"data.tokenizer={str(name)!r} is not known: choose {CHOOSE}")
    return path.resolve()


def is_file_tokenizer(name: str | None) -> bool:
    """Whether name is a tokenizer.json (rather than a built-in name or nothing)."""
    return name is not None and split_added(name)[0] not in TOKENIZERS


def tokenizer_key(name: str) -> str:
    """What identifies a tokenizer's ids, for caches: the name of a built-in one, the content digest of a file."""
    if not is_file_tokenizer(name):
        return name
    digest = "sha256:" + hashlib.sha256(tokenizer_path(name).read_bytes()).hexdigest()
    return with_added(digest, split_added(name)[1])


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two names give the same ids: the same built-in name, or files with the same content."""
    if a == b:
        return True
    try:
        return is_file_tokenizer(a) and is_file_tokenizer(b) and tokenizer_key(a) == tokenizer_key(b)
    except UserError:  # a file that does not exist: the names differ and so do the tokenizers
        return False


def find_tokenizer(name: str, beside: Path) -> str:
    """A recorded tokenizer name as this machine can open it: a built-in name as is; a file by its recorded path,
    relative to `beside` (an export's folder), or else the tokenizer.json next to `beside` or one folder up (a
    run dir moved elsewhere). Unfound files are returned as recorded (opening them reports it)."""
    if not is_file_tokenizer(name):
        return name
    name, added = split_added(name)
    candidates = [Path(name).expanduser(), beside / name, beside / TOKENIZER_FILE, beside.parent / TOKENIZER_FILE]
    return with_added(str(next((p.resolve() for p in candidates if p.is_file()), name)), added)


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes in byte-level BPE vocabularies (Radford et al., 2019): character -> byte.
    Printable Latin-1 bytes stand for themselves; the others are shifted to 256 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


class JSONTokenizer:
    """A Hugging Face tokenizer.json behind the methods of a tiktoken Encoding. Text is encoded without the special
    tokens a post-processor would add (no BOS): documents are separated by eot_token, as GPT-2's are."""

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, str(path)
        try:
            self._special = Tokenizer.from_file(str(path))  # recognises special tokens written in the text
            self._plain = Tokenizer.from_file(str(path))  # treats them as text
        except Exception as e:  # the library's own exception type: not JSON, or not a tokenizer
            raise UserError(f"data.tokenizer={path} is not a readable tokenizer.json ({str(e)[:200]})") from e
        self._plain.encode_special_tokens = True
        self.n_vocab = _vocab_size(self._special, path)
        self.eot_token = self._end_of_text()
        leading = self._leading_id()
        self.add_bos = leading is not None  # what transformers' add_bos_token does with this file
        self.bos_token = leading if self.add_bos else self._configured_id("bos_token", "bos_token_id")
        self._byte_level = isinstance(self._special.decoder, decoders.ByteLevel)

    def __reduce__(self):  # pickles by path and content digest (datasets hashes the map function this way)
        return _open_json_tokenizer, (self.name, tokenizer_key(self.name))

    def _configured_id(self, token_key: str, id_key: str) -> int | None:
        """The id that tokenizer_config.json (next to the file) gives as token_key, else config.json as id_key."""
        for config_name, key in (("tokenizer_config.json", token_key), ("config.json", id_key)):
            try:
                value = json.loads((self.path.parent / config_name).read_text()).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            value = value[0] if isinstance(value, list) and value else value
            value = value.get("content") if isinstance(value, dict) else value
            value = self._special.token_to_id(value) if isinstance(value, str) else value
            if isinstance(value, int) and 0 <= value < self.n_vocab:
                return value
        return None

    def _leading_id(self) -> int | None:
        """The id the tokenizer.json's post-processor puts before every text (transformers encodes with it), if it
        puts exactly one there: a property of the file itself, so copies of it and its content digest carry it."""
        bare = self._special.encode("a", add_special_tokens=False).ids
        full = self._special.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full)) if full[i:i + len(bare)] == bare), 0)
        return full[0] if start == 1 else None

    def _end_of_text(self) -> int:
        """The id that ends a document: eos_token of tokenizer_config.json, else eos_token_id of config.json (next
        to the file), else a well-known end-of-text token in the vocabulary."""
        if (configured := self._configured_id("eos_token", "eos_token_id")) is not None:
            return configured
        for token in END_OF_TEXT:
            if (i := self._special.token_to_id(token)) is not None:
                return i
        raise UserError(f"data.tokenizer={self.path}: no end-of-text token (no eos_token in a tokenizer_config.json "
                        f"beside it, none of {', '.join(END_OF_TEXT)} in its vocabulary): add a tokenizer_config.json "
                        "with \"eos_token\"")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, allowed_special: str | set = frozenset()) -> list[int]:
        """With allowed_special (any non-empty set, or "all"), special tokens written in text become their ids."""
        tok = self._special if allowed_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._special.decode(ids, skip_special_tokens=False)

    def decode_single_token_bytes(self, i: int) -> bytes:
        """One token's bytes, also when it holds part of a UTF-8 character."""
        token = self._special.id_to_token(i)
        if token is None:
            raise KeyError(i)
        table = _BYTE_DECODER
        if self._byte_level and all(c in table for c in token):
            return bytes(table[c] for c in token)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # sentencepiece's byte fallback
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()  # sentencepiece's word-start marker


_BYTE_DECODER = byte_decoder()


def _vocab_size(tok: Tokenizer, path: Path) -> int:
    """One more than the largest id of tok's vocabulary (added tokens included); an empty one is a UserError."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    if not ids:
        raise UserError(f"data.tokenizer={path} has an empty vocabulary (no tokens in its model.vocab nor "
                        "added_tokens): point data.tokenizer at the tokenizer.json the model was trained with")
    return max(ids) + 1


def _open_json_tokenizer(name: str, key: str) -> JSONTokenizer:
    return build_tokenizer(name)
