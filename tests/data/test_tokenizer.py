"""Tokenizers work offline from the ranks shipped in the package."""

import pytest
from tokenizers import Tokenizer, models

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError


def test_gpt2_known_ids_offline():
    tok = build_tokenizer("gpt2")
    assert tok.encode_ordinary("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.encode_ordinary("The weather is") == [464, 6193, 318]
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.decode(tok.encode("Hello, world!<|endoftext|>", allowed_special="all")) == "Hello, world!<|endoftext|>"


def test_bytes_tokenizer_round_trips_utf8():
    tok = build_tokenizer("bytes")
    text = "naïve café ☕"
    ids = tok.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.n_vocab == 257 and tok.eot_token == 256


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="data.tokenizer='gpt3'"):
        build_tokenizer("gpt3")


def test_a_tokenizer_json_with_an_empty_vocabulary_is_one_line(tmp_path):
    Tokenizer(models.BPE(vocab={}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=f"^data.tokenizer={tmp_path / 'tokenizer.json'} has an empty vocabulary"):
        build_tokenizer(str(tmp_path))


def test_a_continuation_ends_at_end_of_text_and_drops_ids_past_the_vocabulary():
    from llmtrain.data.tokenizer import continuation_text

    tok = build_tokenizer("bytes")  # 257 ids, <|endoftext|> = 256
    assert continuation_text(tok, [104, 300, 105, 256, 33]) == "hi"  # 300: a padded model vocabulary's id
    assert continuation_text(tok, [104, 105, 999]) == "hi"
