"""Hugging Face tokenizer.json files as tokenizers: the same interface and ids as tiktoken's, the end-of-text id,
byte-level and byte-fallback tokens, identity by content, and the built-in tokenizers written as tokenizer.json."""

import json
import pickle
import shutil

import pytest
from conftest import make_datamodule
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from llmtrain.data.tokenizer import (
    JSONTokenizer,
    build_tokenizer,
    byte_decoder,
    continuation_text,
    find_tokenizer,
    same_tokenizer,
    tokenizer_key,
    tokenizer_path,
)
from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.errors import UserError

TEXTS = ["Hello, world!  How's it going?\n\n  tabs\there  ", "naïve café ☕ 日本語", "   leading", "trailing   ",
         "a\n\n\nb", "I'm sure we'll see they've", "12345 678.9 $3", "<|endoftext|> stays text", "👍🏽\r\n"]


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory):
    """GPT-2's tiktoken ranks written as a tokenizer.json (the conversion takes a few seconds: once)."""
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    path.write_text(tokenizer_json("gpt2"))
    return path


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_builtin_tokenizers_written_as_tokenizer_json_give_the_same_ids(tmp_path, gpt2_json, name):
    path = gpt2_json if name == "gpt2" else tmp_path / "tokenizer.json"
    if name == "bytes":
        path.write_text(tokenizer_json("bytes"))
    ours, theirs = build_tokenizer(str(path)), build_tokenizer(name)
    assert isinstance(ours, JSONTokenizer)
    assert (ours.n_vocab, ours.eot_token) == (theirs.n_vocab, theirs.eot_token)  # eot found by its name
    for text in TEXTS:
        ids = theirs.encode_ordinary(text)
        assert ours.encode_ordinary(text) == ids, text
        assert ours.decode(ids) == text
    assert ours.encode_ordinary_batch(TEXTS) == theirs.encode_ordinary_batch(TEXTS)
    special = "end<|endoftext|>"
    assert ours.encode(special, allowed_special="all") == theirs.encode(special, allowed_special="all")
    assert ours.encode(special, allowed_special="all")[-1] == theirs.eot_token
    assert ours.decode([theirs.eot_token]) == "<|endoftext|>"
    partial = [i for i in theirs.encode_ordinary("☕ 日本語 café")]  # ids holding parts of UTF-8 characters
    for i in [*partial, *range(0, theirs.n_vocab, 997), theirs.eot_token]:
        assert ours.decode_single_token_bytes(i) == theirs.decode_single_token_bytes(i), i


def test_transformers_reads_the_written_tokenizer_json_alike(gpt2_json):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(gpt2_json))
    tok = build_tokenizer("gpt2")
    for text in TEXTS[:-2]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode_ordinary(text)


def test_end_of_text_comes_from_the_configs_beside_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer_json("bytes"))
    assert JSONTokenizer(folder / "tokenizer.json").eot_token == 256  # <|endoftext|>, by its name
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [13, 256]}))
    assert JSONTokenizer(folder / "tokenizer.json").eot_token == 13  # the first of a list
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "!", "special": True}}))
    assert JSONTokenizer(folder / "tokenizer.json").eot_token == 33  # tokenizer_config.json comes first
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "H"}))
    assert JSONTokenizer(folder / "tokenizer.json").eot_token == 72


def test_a_tokenizer_without_end_of_text_is_a_user_error(tmp_path):
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"tokenizer.json: no end-of-text token .*add a tokenizer_config.json"):
        build_tokenizer(str(tmp_path))  # a folder: its tokenizer.json
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"is not a readable tokenizer.json"):
        build_tokenizer(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"data.tokenizer='nowhere/tokenizer.json' is not known"):
        build_tokenizer("nowhere/tokenizer.json")
    with pytest.raises(UserError, match=r"comes without a tokenizer"):
        build_tokenizer(None)


def test_sentencepiece_style_byte_fallback_tokens_keep_their_bytes(tmp_path):
    """Llama 2 / Mistral tokenizer.json files: '▁' marks a word start and <0xE2>-style tokens hold single bytes."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "▁": 258, "t": 259, "h": 260,
             "e": 261, "▁t": 262, "he": 263, "▁the": 264}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "t"), ("h", "e"), ("▁t", "he")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert ours.eot_token == 1 and ours.n_vocab == 265
    ids = ours.encode_ordinary("the ☕")
    assert ids[0] == 264 and ours.decode(ids) == "the ☕"
    assert [ours.decode_single_token_bytes(i) for i in ids] == [b" the", b" ", b"\xe2", b"\x98", b"\x95"]


def test_pickled_tokenizer_still_treats_special_tokens_as_text(gpt2_json):
    """datasets sends the tokenizer to worker processes by pickle: encode_ordinary must survive it."""
    tok = build_tokenizer(str(gpt2_json))
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode_ordinary("<|endoftext|>") == tok.encode_ordinary("<|endoftext|>") != [tok.eot_token]


def test_a_tokenizer_file_is_known_by_its_content(tmp_path, gpt2_json):
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(gpt2_json, copy)
    assert tokenizer_key(str(copy)) == tokenizer_key(str(gpt2_json)) and same_tokenizer(str(copy), str(gpt2_json))
    assert tokenizer_key("gpt2") == "gpt2" and not same_tokenizer("gpt2", str(gpt2_json))  # same ids, other name
    (tmp_path / "other.json").write_text(tokenizer_json("bytes"))
    assert not same_tokenizer(str(tmp_path / "other.json"), str(gpt2_json))
    assert not same_tokenizer(str(tmp_path / "gone.json"), str(gpt2_json))
    assert tokenizer_path(str(copy.parent)) == copy.resolve()


def test_a_moved_run_finds_its_copied_tokenizer(tmp_path, gpt2_json):
    run = tmp_path / "moved-run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(gpt2_json, run / "tokenizer.json")
    recorded = "/old/place/run/tokenizer.json"
    assert find_tokenizer(recorded, run / "checkpoints") == str((run / "tokenizer.json").resolve())
    assert find_tokenizer("tokenizer.json", run) == str((run / "tokenizer.json").resolve())  # an export's own
    assert find_tokenizer("gpt2", run) == "gpt2"
    assert find_tokenizer(recorded, tmp_path) == recorded  # nowhere to be found: as recorded


def test_pretraining_data_from_a_tokenizer_json_has_the_ids_of_the_same_tokenizer(tmp_path, gpt2_json):
    """The token cache: same ids as the built-in gpt2; keyed by the file's content, so that a copy reuses it."""
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i}: naïve café, the quick brown fox." for i in range(40)))
    args = dict(path=str(tmp_path / "a.txt"), context_length=16, batch_size=4, num_proc=1,
                val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    builtin = make_datamodule("text", tokenizer="gpt2", **args)
    from_json = make_datamodule("text", tokenizer=str(gpt2_json), **args)
    for dm in (builtin, from_json):
        dm.prepare_data()
    assert from_json.cache.dir != builtin.cache.dir
    assert (from_json.cache.tokens("train") == builtin.cache.tokens("train")).all()
    copy = tmp_path / "copy.json"
    shutil.copy(gpt2_json, copy)
    assert make_datamodule("text", tokenizer=str(copy), **args).cache.dir == from_json.cache.dir


def test_an_export_carries_its_tokenizer_json_and_finds_it_after_a_move(tmp_path):
    """A GPT-2-layout export of a model trained with a tokenizer.json holds a copy, and is read back with it
    after both the source file and the folder moved; transformers reads the same ids from it."""
    import torch
    import transformers

    from llmtrain.interop.hf import export_hf
    from llmtrain.interop.pretrained import load_pretrained
    from llmtrain.model.gpt import GPT, GPTConfig

    source = tmp_path / "tok" / "tokenizer.json"
    source.parent.mkdir()
    source.write_text(tokenizer_json("bytes"))
    model = GPT(GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    out = export_hf(model, tmp_path / "hf", {"tokenizer": str(source)})
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "llmtrain.json").read_text())["tokenizer"] == "tokenizer.json"
    export_hf(model, out, {"tokenizer": str(source)})  # an export with its tokenizer: replaceable
    shutil.rmtree(source.parent)
    moved = shutil.move(out, tmp_path / "elsewhere")
    loaded, info = load_pretrained(str(moved))
    assert info.tokenizer == str((tmp_path / "elsewhere" / "tokenizer.json").resolve())
    assert build_tokenizer(info.tokenizer).encode_ordinary("ab") == [97, 98]
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    assert transformers.AutoTokenizer.from_pretrained(moved)("ab")["input_ids"] == [97, 98]


def test_a_run_keeps_a_copy_of_its_tokenizer_json(tmp_path, gpt2_json):
    from llmtrain.run.outputs import keep_tokenizer

    run_dir = tmp_path / "run"
    assert keep_tokenizer("gpt2", run_dir) == "gpt2" and not run_dir.exists()
    assert keep_tokenizer(str(gpt2_json), run_dir, write=False) == str((run_dir / "tokenizer.json").resolve())
    assert not run_dir.exists()  # another rank: names the copy, leaves the writing to the launching rank
    kept = keep_tokenizer(str(gpt2_json), run_dir)
    assert kept == str((run_dir / "tokenizer.json").resolve())
    assert (run_dir / "tokenizer.json").read_bytes() == gpt2_json.read_bytes()
    assert keep_tokenizer(kept, run_dir) == kept  # resuming in the same run dir: the copy is its own source
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer.json"]


def test_checks_take_a_copy_of_the_checkpoints_tokenizer_and_refuse_another(tmp_path, gpt2_json):
    from dataclasses import asdict

    import torch
    from conftest import compose

    from llmtrain.model.gpt import GPT, GPTConfig
    from llmtrain.run.resolve import resolve_run

    model = GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    torch.save({"state_dict": {}, "llmtrain": {"model_config": asdict(model.config), "tokenizer": str(gpt2_json),
                                               "stage": "pretrain"}}, tmp_path / "base.ckpt")
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(gpt2_json, copy)
    stage = ["finetune=instruct", f"init_from={tmp_path / 'base.ckpt'}"]
    assert resolve_run(compose(stage, tmp_path)).tokenizer == str(gpt2_json.resolve())  # null: the checkpoint's
    assert resolve_run(compose([*stage, f"data.tokenizer={copy.parent}"], tmp_path)).tokenizer == str(copy.resolve())
    with pytest.raises(UserError, match=r"data.tokenizer=gpt2 but init_from=.* was trained with .*tokenizer.json: set "
                                        r"data.tokenizer=.*tokenizer.json \(or null"):
        resolve_run(compose([*stage, "data.tokenizer=gpt2"], tmp_path))
    with pytest.raises(UserError, match=r"model.vocab_size=100 is smaller than the .*tokenizer.json tokenizer's 50257"):
        resolve_run(compose(["model.vocab_size=100", f"data.tokenizer={copy}"], tmp_path))


@pytest.fixture
def eot_first(tmp_path):
    """A byte-level tokenizer.json whose end-of-text id is 0, as SmolLM's is (GPT-2's is its last id, 50256)."""
    table = {b: c for c, b in byte_decoder().items()}
    tok = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0} | {table[b]: b + 1 for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return build_tokenizer(str(tmp_path / "tokenizer.json"))


def always_x(vocab_size: int = 257):
    """A tiny GPT whose every next token is 'x' (id 121 under eot_first)."""
    import torch

    from llmtrain.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=vocab_size, context_length=256, emb_dim=16, n_heads=2, n_layers=1)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[121] = 100.0
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
    return model


def test_continuations_end_at_the_end_of_text_id_wherever_it_lies(eot_first):
    assert eot_first.eot_token == 0 and eot_first.encode_ordinary("xy") == [121, 122]
    assert continuation_text(eot_first, [121, 122, 0, 121]) == "xy"
    assert continuation_text(eot_first, [121, 300, 122]) == "xy"  # an id of a padded vocabulary: dropped
    assert continuation_text(build_tokenizer("bytes"), [120, 256, 121]) == "x"


def test_test_answers_and_tensorboard_samples_use_the_tokenizers_end_of_text(eot_first, tmp_path):
    """The instruct stage's test answers and the LanguageModel's samples decode what the model generated, also when
    the end-of-text id is 0 (a filter `id < eot_token` would keep nothing)."""
    from types import SimpleNamespace

    from conftest import lm_stage

    from llmtrain.stages.instruct import TEST_GENERATIONS, Instruct
    from llmtrain.training.module import LanguageModel

    model = always_x()
    instruct = Instruct(train_blocks="all", lora=None, loss_chunk=None, num_samples=0, sample_tokens=0,
                        test_generations=None, max_new_tokens=3)
    records = [{"instruction": "Say x.", "input": "", "output": "x"}]
    instruct.write_files(model, SimpleNamespace(tokenizer=eot_first, records={"test": records}), tmp_path)
    assert json.loads((tmp_path / TEST_GENERATIONS).read_text())["generated"] == "xxx"

    texts = []

    class Probe(LanguageModel):  # a module with a logger, outside a Trainer
        loggers = [SimpleNamespace(log_samples=lambda samples, step: texts.extend(samples.values()))]
        global_rank, global_step = 0, 0
        trainer = SimpleNamespace(strategy=None)  # not sharded

    probe = Probe(model, lm_stage(sample_prompt="ab", sample_tokens=4), optimizer=None, warmup_steps=0, max_steps=1,
                  min_lr_ratio=0.1, tokenizer=str(tmp_path / "tokenizer.json"))
    probe._log_samples()
    assert texts == ["ab**xxxx**"]


def test_a_lora_adapter_of_a_moved_run_finds_the_runs_tokenizer(tmp_path):
    """llmtrain_adapter.json records the run's copy of its tokenizer.json; moved with the run, it is found there."""
    import torch

    from llmtrain.generate import load_model
    from llmtrain.interop.lora import apply_lora, save_adapter
    from llmtrain.model.gpt import GPT, GPTConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text(tokenizer_json("bytes"))
    base = GPT(GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    torch.save({"state_dict": {"model." + k: v for k, v in base.state_dict().items()},
                "llmtrain": {"model_config": base.config.__dict__, "tokenizer": "bytes"}},
               tmp_path / "base.ckpt")
    adapter = save_adapter(apply_lora(base, r=2, dropout=0.0), run / "adapter")
    (adapter / "llmtrain_adapter.json").write_text(json.dumps(
        {"base": str(tmp_path / "base.ckpt"), "tokenizer": "/where/the/run/was/tokenizer.json"}))
    _, info = load_model(str(adapter))
    assert info.tokenizer == str((run / "tokenizer.json").resolve())
