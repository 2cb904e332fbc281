"""Chat fine-tuning: the loss on the assistant's tokens of every turn (or on all), conversations as batches, the
vocabulary grown for the template's tokens, and the whole stage from the command line."""

import json

import pytest
import torch
from conftest import compose, make_datamodule, run_cli, write_checkpoint

from llmtrain.data.chat_template import chat_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.model.losses import IGNORE_INDEX, lm_loss_sum
from llmtrain.model.vocab import grow_vocab
from llmtrain.stages.chat import Chat

CHATML_BYTES = chat_tokenizer("bytes", "chatml")


def chat(train_on: str = "assistant", loss_chunk: int | None = None) -> Chat:
    return Chat(train_blocks="all", lora=None, loss_chunk=loss_chunk, train_on=train_on)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "c.jsonl"
    rows = [{"messages": [{"role": "system", "content": f"System {i}."}, {"role": "user", "content": f"Q{i}?"},
                          {"role": "assistant", "content": f"A{i}."}, {"role": "user", "content": "More?"},
                          {"role": "assistant", "content": "Done" * (i % 3 + 1)}]} for i in range(40)]
    rows[5] = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    rows[6]["messages"][1]["content"] = "long " * 60  # its answers start past max_length (256): left out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make_datamodule("chat_json", path=str(path), tokenizer=CHATML_BYTES, context_length=256)
    dm.setup("fit")
    return dm


def test_conversations_without_an_assistant_token_after_truncation_are_left_out(datamodule):
    assert sum(len(datamodule.sets[s]) for s in ("train", "val", "test")) == 39


def test_a_malformed_row_of_a_file_is_named_by_its_row_or_skipped_and_counted(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 20
    rows[7] = {"messages": [{"role": "user", "content": "q"}]}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make_datamodule("chat_json", path=str(tmp_path / "c.jsonl"), tokenizer=CHATML_BYTES)
    with pytest.raises(UserError, match=r"^data.path row 7 \(train record 6\): messages has no assistant turn"):
        dm.setup("fit")
    skipping = make_datamodule("chat_json", path=str(tmp_path / "c.jsonl"), tokenizer=CHATML_BYTES,
                               on_bad_record="skip")  # data.on_bad_record=skip: left out and counted in one line
    skipping.setup("fit")
    assert sum(len(skipping.conversations[s]) for s in ("train", "val", "test")) == 19
    out = capsys.readouterr().out
    assert out.count("malformed") == 1 and ("data: 1 of 20 conversations are malformed and left out "
                                            "(data.on_bad_record=skip), the first: data.path row 7") in out


def test_the_hub_preset_reads_a_dataset_of_the_shape_it_names(tmp_path):
    """data=chat_hub names a Hub dataset and a config of it; a local folder in the Hub's layout (a README whose
    configs list the files, extra columns, train and test splits) goes through the same loading."""
    hub = tmp_path / "smoltalk"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: everyday-conversations\n  data_files:\n"
                                   "  - split: train\n    path: data/train.jsonl\n"
                                   "  - split: test\n    path: data/test.jsonl\n---\n")
    for split, n in (("train", 60), ("test", 5)):
        rows = [{"full_topic": "t", "messages": [{"role": "user", "content": f"Q{i}?"},
                                                 {"role": "assistant", "content": f"A{i}."}]} for i in range(n)]
        (hub / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make_datamodule("chat_hub", path=str(hub), tokenizer=CHATML_BYTES)
    assert (dm.source, dm.subset) == ("hub", "everyday-conversations")
    dm.setup("fit")
    questions = [c[0]["content"] for s in ("train", "val", "test") for c in dm.conversations[s]]
    assert sorted(questions) == sorted(f"Q{i}?" for i in range(60))  # the Hub's train split, divided


def test_a_batch_marks_the_assistant_targets_and_pads_with_ignore(datamodule):
    batch = datamodule.collate([datamodule.sets["train"][i] for i in range(4)])
    labels, assistant, lengths = batch["labels"], batch["assistant"], batch["lengths"]
    assert labels.shape == assistant.shape == batch["input_ids"].shape
    for row in range(4):
        n = int(lengths[row])
        assert (labels[row, n:] == IGNORE_INDEX).all() and not assistant[row, n:].any()
        text = datamodule.tokenizer.decode(labels[row, :n][assistant[row, :n]].tolist())
        assert text.count("<|im_end|>") == 2 and "System" not in text and "<|im_start|>" not in text


@pytest.mark.parametrize("chunk", [None, 7])
def test_the_loss_is_summed_over_assistant_targets_only_or_all(datamodule, chunk):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=259, context_length=256, emb_dim=16, n_heads=2, n_layers=1))
    batch = datamodule.collate([datamodule.sets["train"][i] for i in range(4)])
    total, count, _ = chat("assistant", chunk).loss(model, batch)
    masked = batch["labels"].masked_fill(~batch["assistant"], IGNORE_INDEX)
    expected, n = lm_loss_sum(model(batch["input_ids"]), masked)
    assert int(count) == int(batch["assistant"].sum()) == int(n)
    assert torch.allclose(total, expected, atol=1e-4)
    total, count, _ = chat("all", chunk).loss(model, batch)
    assert int(count) == int(batch["lengths"].sum())
    assert torch.allclose(total, lm_loss_sum(model(batch["input_ids"]), batch["labels"])[0], atol=1e-4)


def test_packed_conversations_give_the_loss_of_the_unpacked_ones(datamodule):
    """data.packing: whole conversations share rows, each attending to itself; the assistant-only loss is unchanged."""
    from llmtrain.data.packing import pack

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=259, context_length=256, emb_dim=16, n_heads=2, n_layers=1))
    items = [datamodule.sets["train"][i] for i in range(12)]
    plain = chat().loss(model, datamodule.collate(items))
    datamodule.packing = True
    try:
        rows = pack(items, 256)
        packed_batch = datamodule.collate(rows)
    finally:
        datamodule.packing = False
    assert len(rows) < len(items) and packed_batch["assistant"].sum() == sum(sum(a) for _, _, a in items)
    packed = chat().loss(model, packed_batch)
    assert int(packed[1]) == int(plain[1])
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-4)


def test_train_on_must_be_assistant_or_all():
    with pytest.raises(ValueError, match="finetune.train_on='prompt' is not one of assistant, all"):
        chat("prompt")


@pytest.mark.parametrize("tie", [True, False])
def test_a_grown_vocabulary_starts_its_new_rows_at_the_mean_row(tie):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=16, emb_dim=8, n_heads=2, n_layers=1, tie_weights=tie))
    emb, head = model.tok_emb.weight.detach().clone(), model.head.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    grow_vocab(model, 259)
    assert model.config.vocab_size == 259 and model.tied == tie
    assert torch.equal(model.tok_emb.weight[:257], emb) and torch.equal(model.head.weight[:257], head)
    assert torch.allclose(model.tok_emb.weight[257:], emb.mean(0).expand(2, -1))
    assert torch.allclose(model.head.weight[257:], head.mean(0).expand(2, -1))
    assert torch.allclose(model(ids)[..., :257], before)
    assert model(torch.tensor([[258]])).shape == (1, 1, 259)
    with pytest.raises(ValueError):
        grow_vocab(model, 259)


def test_a_chat_run_adds_the_templates_tokens_and_grows_the_starting_model(tmp_path):
    from llmtrain.run.resolve import resolve_run
    from llmtrain.run.train import start_model

    ckpt = write_checkpoint(tmp_path / "pre.ckpt")
    run = resolve_run(compose(["finetune=chat", f"init_from={ckpt}", "trainer.accelerator=cpu"], tmp_path / "r"))
    assert run.tokenizer == CHATML_BYTES and run.model_config.vocab_size == 259
    cfg = compose(["finetune=chat", f"init_from={ckpt}"], tmp_path / "r")
    assert start_model(cfg, run).tok_emb.weight.shape == (259, 32)
    alpaca = resolve_run(compose(["finetune=chat", f"init_from={ckpt}", "data.chat_template=alpaca"], tmp_path / "a"))
    assert alpaca.tokenizer == "bytes" and alpaca.model_config.vocab_size == 257  # nothing to add


@pytest.mark.slow
def test_chat_fine_tuning_from_the_command_line(tmp_path):
    """A bytes checkpoint fine-tuned on the shipped conversations in ChatML: the tokens are added, the model grows,
    the assistant-token loss falls, and the checkpoint records the tokenizer with its added tokens."""
    ckpt = write_checkpoint(tmp_path / "pre.ckpt")
    args = ["finetune=chat", f"init_from={ckpt}", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=3",
            "callbacks.progress_bar=null", "data.batch_size=4", "optimizer.lr=3e-3", f"hydra.run.dir={tmp_path / 'c'}",
            "data.max_dropped_fraction=1.0"]  # a context of 64 bytes: most conversations lose their answers
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    before = float(result.stdout.split("before fine-tuning: val/loss ")[1].split()[0].rstrip(","))
    after = float(result.stdout.split("done: 4 steps, val/loss ")[1].split(",")[0])
    assert after < before
    saved = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["llmtrain"]["tokenizer"] == CHATML_BYTES and saved["llmtrain"]["stage"] == "chat"
    assert saved["state_dict"]["model.tok_emb.weight"].shape == (259, 32)
    hf = tmp_path / "c" / "hf"  # the export chats in ChatML and stops at <|im_end|>
    assert "<|im_start|>" in json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [258, 256]
