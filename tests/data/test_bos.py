"""A tokenizer that starts every text with a begin-of-text token (Llama 3's <|begin_of_text|>, Llama's <s>): its
tokenizer.json says so (the post-processor), and llmtrain puts it first wherever it encodes a text: pretraining
documents, instruction and classification records, generation prompts; exports say so to transformers."""

import json

import pytest
import torch
from conftest import make_datamodule
from tokenizers import Tokenizer, processors

from llmtrain.data.tables import encode_instruction
from llmtrain.data.tokenizer import bos_prefix, build_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.text import encode_prompt

BOS = "<|begin_of_text|>"


def write_bos_tokenizer(folder):
    """The bytes tokenizer as a tokenizer.json with <|begin_of_text|> (id 257) put before every text by its
    post-processor, as Llama 3's tokenizer.json does."""
    tok = Tokenizer.from_str(tokenizer_json("bytes"))
    tok.add_special_tokens([BOS])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    return build_tokenizer(str(write_bos_tokenizer(tmp_path_factory.mktemp("bos"))))


def test_the_post_processor_decides_whether_texts_start_with_bos(bos_tok, tmp_path):
    assert bos_tok.add_bos and bos_tok.bos_token == 257 and bos_prefix(bos_tok) == [257]
    assert bos_tok.eot_token == 256  # <|endoftext|> still ends a document
    plain = tmp_path / "plain" / "tokenizer.json"
    plain.parent.mkdir()
    plain.write_text(tokenizer_json("bytes"))
    assert not build_tokenizer(str(plain)).add_bos and bos_prefix(build_tokenizer(str(plain))) == []
    assert bos_prefix(build_tokenizer("gpt2")) == [] and bos_prefix(build_tokenizer("bytes")) == []


def test_every_pretraining_document_starts_with_bos(bos_tok, tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n\nthird")
    dm = make_datamodule("text", tokenizer=str(bos_tok.path), path=str(tmp_path / "a.txt"), context_length=8,
                         batch_size=2, num_proc=1, val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    ids = [int(i) for split in ("train", "val") for i in dm.cache.tokens(split)]
    docs = [[257, *b"first doc", 256], [257, *b"second doc", 256], [257, *b"third", 256]]
    assert sorted(ids) == sorted(i for d in docs for i in d) and ids.count(257) == 3
    assert ids[0] == 257 and all(ids[i + 1] == 257 for i, t in enumerate(ids[:-1]) if t == 256)


def test_instruction_and_classification_records_start_with_bos(bos_tok, tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": t[0]}) for t in ("abc", "bcd") * 5))
    dm = make_datamodule("classify_embedded", source="json", path=str(tmp_path / "t.jsonl"),
                         tokenizer=str(bos_tok.path), context_length=16, max_length=3)
    dm.setup()
    assert all(ids[0] == 257 and len(ids) == 3 for ids, _ in dm.sets["train"])  # bos, then the text cut to fit
    x, y = encode_instruction(bos_tok, {"instruction": "Say hi", "output": "hi"}, max_length=200, mask_prompt=True)
    assert x[0] == 257 and x.count(257) == 1
    n_prompt = len(x) - len(b"hi")  # labels: the prompt (with its bos) masked, then "hi" and <|endoftext|>
    assert y[n_prompt - 1:] == [*b"hi", 256] and set(y[:n_prompt - 1]) == {-100}


def test_a_prompt_gets_bos_once_and_keeps_it_when_cut(bos_tok):
    gpt = GPT(GPTConfig(vocab_size=258, context_length=8, emb_dim=8, n_heads=1, n_layers=1))
    assert encode_prompt(gpt, bos_tok, "ab")[0].tolist() == [257, 97, 98]
    assert encode_prompt(gpt, bos_tok, f"{BOS}ab")[0].tolist() == [257, 97, 98]  # written by the user: once
    assert encode_prompt(gpt, bos_tok, "")[0].tolist() == [257]
    assert encode_prompt(gpt, bos_tok, "abcdefghij")[0].tolist() == [257, *b"defghij"]  # the last 7 and bos
    assert encode_prompt(gpt, build_tokenizer("bytes"), "")[0].tolist() == [256]  # GPT-2's: <|endoftext|>


def test_an_export_encodes_in_transformers_as_llmtrain_does(bos_tok, tmp_path):
    """The Llama-layout export's tokenizer: transformers puts the same bos first, and its configs name it."""
    transformers = pytest.importorskip("transformers")
    from llmtrain.interop.llama import export_llama

    config = GPTConfig(vocab_size=258, context_length=16, emb_dim=16, n_heads=2, n_layers=1, pos_emb="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, tie_weights=False)
    out = export_llama(GPT(config), str(bos_tok.path), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Say hi", "naïve café", ""):
        assert hf_tok(text)["input_ids"] == bos_prefix(bos_tok) + bos_tok.encode_ordinary(text)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == 257
    assert torch.equal(encode_prompt(GPT(config), bos_tok, "hi")[0],
                       torch.tensor(hf_tok("hi")["input_ids"]))
