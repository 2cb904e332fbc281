"""Every value of the config is used or refused: init_from's architecture with the model node's applied values, and
data and stage keys that the chosen source or task would not read."""

from functools import partial

import pytest
import torch
from conftest import TINY, compose, write_checkpoint
from torch import nn

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.run.resolve import resolve_run
from llmtrain.run.train import start_model
from llmtrain.training.module import LanguageModel


@pytest.fixture
def base_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "base.ckpt")


def test_values_that_change_no_shape_reach_the_trained_model_and_its_checkpoint(tmp_path, base_ckpt):
    cfg = compose(["finetune=instruct", f"init_from={base_ckpt}", "model.drop_rate=0.1", "model.context_length=48"],
                  tmp_path)
    run = resolve_run(cfg)
    model = run.stage.build_model(start_model(cfg, run))
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 2 * 2 and set(dropouts) == {0.1}  # embeddings, and 2 per block
    assert all(block.attn.drop_rate == 0.1 for block in model.blocks)
    assert model.pos_emb.weight.shape == (48, 32) and model.config.context_length == 48
    checkpoint = {}
    LanguageModel(model, run.stage, partial(torch.optim.AdamW), 0, 10, 0.1, tokenizer="bytes").on_save_checkpoint(
        checkpoint)
    info = ModelInfo.from_meta("llmtrain", "x", checkpoint["llmtrain"], "x")
    assert info.model_config.drop_rate == 0.1 and info.model_config.context_length == 48


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_a_run_that_trains_in_bf16_starts_from_bf16_weights(tmp_path, base_ckpt, precision, dtype):
    """bf16-true trains the weights themselves in bf16: loaded straight into it; mixed precision keeps float32."""
    cfg = compose(["finetune=instruct", f"init_from={base_ckpt}", f"trainer.precision={precision}"], tmp_path)
    run = resolve_run(cfg)
    assert run.precision == precision
    assert {p.dtype for p in start_model(cfg, run).parameters()} == {dtype}


REFUSED = [
    ([*TINY, "data=text", "data.path=books.txt", "data.subset=wikitext"],
     "data.subset='wikitext' names a configuration of a Hub dataset, but this run reads data.source=text"),
    ([*TINY, "data=json", "data.path=rows.jsonl", "data.split=validation"],
     "data.split='validation' picks a split of a Hub dataset, but data.source=json has one split (train): drop "
     "data.split (data.val_fraction holds out documents)"),
    ([*TINY, "data=parquet", "data.path=rows.parquet", "data.sample_by=line"],
     "data.sample_by=line splits text files into documents, but data.source=parquet reads a document per row"),
    ([*TINY, "data.sample_by=document"], "data.sample_by=document splits text files into documents, but "
                                         "data.source=embedded reads a document per row"),
    ([*TINY, "data.path=books.txt"], "data.path='books.txt' is read as text files, which need data.sample_by"),
    (["finetune=classify", "model=gpt_tiny", "data.tokenizer=gpt2", "data.test_fraction=0.3"],
     "data.test_fraction=0.3 would divide a table of your own (data.path), but the shipped data comes in fixed splits"),
    (["finetune=classify", "model=gpt_tiny", "data.tokenizer=gpt2", "data.split=dev"],
     "data.split='dev' picks a split of a Hub dataset, but data.source=embedded has one split (train): drop "
     "data.split (data.val_fraction and data.test_fraction hold out rows)"),
    (["finetune=classify", "model=gpt_tiny", "finetune._target_=llmtrain.stages.pretrain.Pretrain", "data=embedded"],
     "the pretrain stage needs finetune.loss_chunk, finetune.sample_prompt, finetune.sample_tokens: set "
     "finetune.loss_chunk=... finetune.sample_prompt=... finetune.sample_tokens=..., or choose its own preset "
     "(finetune=pretrain)"),
    (["finetune._target_=llmtrain.stages.instruct.Instruct", "data=instruct_embedded", "data.tokenizer=gpt2"],
     "finetune.sample_prompt is not a setting of the instruct stage: drop it (its settings are train_blocks, lora, "
     "loss_chunk, num_samples, sample_tokens, test_generations, max_new_tokens); the instruct stage needs "
     "finetune.num_samples, finetune.test_generations, finetune.max_new_tokens"),
    ([*TINY, "tokens_per_step=512", "trainer.accumulate_grad_batches=2"],
     "tokens_per_step=512 sets the gradient accumulation itself, so trainer.accumulate_grad_batches=2 would be "
     "ignored"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[r[1].split(" ")[0] for r in REFUSED])
def test_a_value_that_would_not_be_read_is_refused(tmp_path, overrides, message):
    with pytest.raises(UserError) as e:
        resolve_run(compose(overrides, tmp_path))
    assert message in str(e.value)


@pytest.mark.parametrize("overrides", [
    [*TINY, "data=tinystories", "data.subset=default", "data.split=validation"],  # the Hub reads both
    [*TINY, "data=text", "data.path=books.txt", "data.sample_by=line"],
    [*TINY, "data.path=rows.jsonl"],  # the extension names the source: read, not ignored
    ["finetune=classify", "model=gpt_tiny", "data.tokenizer=gpt2", "data.path=rows.csv", "data.val_fraction=0.3"],
    ["finetune=classify", "model=gpt_tiny", "data=sms_spam", "data.tokenizer=gpt2", "data.split=train"],
    ["finetune=classify", "lora=default", "model=gpt_tiny", "data.tokenizer=gpt2"],
])
def test_values_the_source_or_stage_reads_are_accepted(tmp_path, overrides):
    resolve_run(compose(overrides, tmp_path))


def test_a_data_path_that_does_not_exist_stops_the_classify_stage_in_one_line(tmp_path, base_ckpt):
    from llmtrain.run.train import train

    cfg = compose(["finetune=classify", f"init_from={base_ckpt}", "data.path=/nonexistent/file.csv"], tmp_path)
    assert resolve_run(cfg).tokenizer == "bytes"  # read as csv: the source is not the shipped data
    with pytest.raises(UserError, match=r"^data.path='/nonexistent/file.csv' matches no file \(cwd: .*\): fix the "
                                        r"path or the glob$"):
        train(cfg)
