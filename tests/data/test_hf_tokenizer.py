"""Hugging Face tokenizer files from our tiktoken ranks: transformers' AutoTokenizer gives llmtrain's ids."""

from __future__ import annotations

import json

import pytest
import transformers

from llmtrain.data.tokenizer import ENDOFTEXT, build_tokenizer
from llmtrain.data.tokenizer_json import byte_chars, recover_merges, tokenizer_files

AWKWARD = [
    "Hello world",
    "naïve café, Ångström, façade; Ελληνικά; русский; 東京タワー; 한국어; العربية; e\u0301 (combining)",
    "emoji 🤖 and a family 👩\u200d👩\u200d👧 and flags 🇫🇷🇯🇵",
    "  two leading spaces\tand\ttabs\n\n\n\nfour newlines, trailing spaces   ",
    "   ",
    "\n",
    "line\r\nwindows line\r\n\r\n",
    "def f(x):\n    return {'k': [x ** 2, x // 3]}  # comment\n\n\nclass A:\n\tpass\n",
    'if (a && b || !c) { printf("%d\\n", *p++); } /* C */ $x =~ s/\\s+$//;',
    "it's they're we'll I'd I'M YOU'LL don't",
    "12345 3.14159 1,000,000 2026-11-29 0x1F",
    "\u200b zero width \ufeff bom \u00ad soft hyphen \x00\x01\x7f controls",
    "ÿþ Latin-1 bytes Ā and beyond ſ",
    "a<|endoftext|>b",
    "<|endoftext|>starts, ends<|endoftext|>",
    "not special: <|endoftext| and <endoftext|>",
]


@pytest.fixture(scope="module", params=["gpt2", "bytes"])
def pair(request, tmp_path_factory):
    """(our tiktoken encoding, transformers' tokenizer from the files we write)."""
    folder = tmp_path_factory.mktemp(request.param)
    for name, text in tokenizer_files(request.param, context_length=64).items():
        (folder / name).write_text(text, encoding="utf-8")
    return build_tokenizer(request.param), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", AWKWARD)
def test_transformers_gives_our_ids_and_decodes_back(pair, text):
    ours, hf = pair
    assert hf(text)["input_ids"] == ours.encode(text, allowed_special={ENDOFTEXT})  # <|endoftext|>: one id
    assert hf(text, split_special_tokens=True)["input_ids"] == ours.encode_ordinary(text)  # as corpus text
    assert hf.decode(hf(text)["input_ids"]) == text


def test_special_tokens_and_lengths(pair):
    ours, hf = pair
    assert hf.eos_token == hf.bos_token == ENDOFTEXT and hf.eos_token_id == ours.eot_token
    assert hf.pad_token is None  # a language model's export leaves padding unset, as GPT-2 does
    assert len(hf) == ours.n_vocab and hf.model_max_length == 64


def test_gpt2_files_are_the_released_ones_in_shape():
    files = tokenizer_files("gpt2", context_length=1024, pad=True)
    merges = files["merges.txt"].splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 50_000
    assert merges[1:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e"]  # GPT-2's first merges ("Ġ" is the space byte)
    vocab = json.loads(files["vocab.json"])
    assert len(vocab) == 50_257 and vocab["Ġthe"] == 262 and vocab["!"] == 0 and vocab[ENDOFTEXT] == 50256
    assert json.loads(files["tokenizer_config.json"])["pad_token"] == ENDOFTEXT  # a classifier's export pads


def test_bytes_files_have_one_token_per_byte_and_no_merges():
    files = tokenizer_files("bytes", context_length=32)
    assert files["merges.txt"] == "#version: 0.2\n"
    vocab = json.loads(files["vocab.json"])
    assert vocab == {**{byte_chars()[b]: b for b in range(256)}, ENDOFTEXT: 256}


def test_byte_chars_are_gpt2s_spelling_of_bytes():
    """transformers' byte-level pre-tokenizer spells bytes with its own fixed table: vocab.json must use the same."""
    from tokenizers import pre_tokenizers

    chars = byte_chars()
    assert len(set(chars)) == 256 and set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    spelled = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        "".join(map(chr, range(128))))[0][0]  # the ASCII bytes, as transformers spells them
    assert spelled == "".join(chars[:128])
    assert [chars[b] for b in (0x20, 0x7E, 0x7F, 0xA0, 0xAD, 0xFF)] == ["Ġ", "~", "ġ", "ł", "Ń", "ÿ"]


def test_merges_are_recovered_from_ranks_and_a_broken_table_is_refused():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert recover_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]  # "bc" merges before "ab"
    with pytest.raises(ValueError, match=r"token b'abc' \(rank 3\) is not the merge of two lower-ranked tokens"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})
