"""Fine-tuning stages: classify and instruct data contracts, trainable sets, loss normalisation, the chain."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, lm_stage, make_datamodule, read_hparams, read_scalars, run_cli, trainable_names
from torch.utils.data import DataLoader

from llmtrain.data.prompts import format_prompt
from llmtrain.data.tables import encode_instruction
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.base import set_trainable
from llmtrain.stages.classify import Classify
from llmtrain.training.module import LanguageModel


def replace_head(model: GPT, n: int) -> GPT:
    model.replace_head(n)
    return model


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=3) | kw)))


def test_classify_trains_last_block_final_norm_and_head_by_default():
    m = replace_head(tiny_gpt(tie_weights=True), 2)
    set_trainable(m, "last")
    names = trainable_names(m)
    assert names == {n for n, _ in m.named_parameters() if n.startswith(("blocks.2.", "ln_f.", "head."))}
    set_trainable(m, "head")
    assert trainable_names(m) == {"head.weight"}
    set_trainable(m, 2)
    assert {n.split(".")[1] for n in trainable_names(m) if n.startswith("blocks.")} == {"1", "2"}
    set_trainable(m, "all")
    assert trainable_names(m) == {n for n, _ in m.named_parameters()}


def test_classification_does_not_depend_on_padding(tmp_path):
    rows = [{"text": "short", "label": "a"}, {"text": "a much longer text than the other one", "label": "b"}]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = make_datamodule("classify_embedded", source="json", path=str(tmp_path / "train.jsonl"), tokenizer="bytes",
                         context_length=64, val_fraction=0.0, test_fraction=0.0)
    dm.sets = {}
    tok = build_tokenizer("bytes")
    items = [(tok.encode_ordinary(r["text"]), i) for i, r in enumerate(rows)]
    model, stage = replace_head(tiny_gpt(), 2).eval(), Classify(train_blocks="last", lora=None)
    alone = stage.logits(model, dm.collate(items[:1]))
    padded = stage.logits(model, dm.collate(items))  # the short text now carries padding
    assert dm.collate(items)["input_ids"].shape[1] > len(items[0][0])
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_embedded_classify_data_maps_labels_and_has_splits():
    dm = make_datamodule("classify_embedded", tokenizer="gpt2", context_length=128, max_length=64)
    dm.setup()
    assert dm.label_names == ["devil", "jargon"]
    assert {len(dm.sets[s]) for s in ("train", "val", "test")} and all(len(dm.sets[s]) > 100 for s in dm.sets)
    assert max(len(x) for x, _ in dm.sets["train"].items) <= 64
    assert 0.6 < dm.majority_baseline("test") < 0.8


def test_unseen_label_and_missing_column_are_user_errors(tmp_path):
    from llmtrain.errors import UserError

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": "x" if i else "only-once"})
                                                for i in range(40)))
    dm = make_datamodule("classify_embedded", source="json", path=str(tmp_path / "d.jsonl"), tokenizer="bytes",
                         context_length=32, val_fraction=0.5, test_fraction=0.0)
    with pytest.raises(UserError):
        dm.setup()
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps({"body": f"t{i}", "label": "x"}) for i in range(40)))
    dm = make_datamodule("classify_embedded", source="json", path=str(tmp_path / "e.jsonl"), tokenizer="bytes",
                         context_length=32)
    with pytest.raises(UserError, match="no column 'text'"):
        dm.setup()
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps({"instruction": f"i{i}"}) for i in range(40)))
    dm = make_datamodule("instruct_embedded", source="json", path=str(tmp_path / "f.jsonl"), tokenizer="bytes",
                         context_length=32)
    with pytest.raises(UserError, match="no column 'output'"):
        dm.setup()


def test_prompt_masking_and_a_single_end_of_text_target():
    tok = build_tokenizer("gpt2")
    record = {"instruction": "Define \"cat\".", "input": "", "output": "A small furry animal."}
    x, y = encode_instruction(tok, record, max_length=256, mask_prompt=True)
    prompt = tok.encode_ordinary(format_prompt(record["instruction"]))
    response = tok.encode_ordinary(record["output"])
    assert len(x) == len(y) == len(prompt) + len(response)
    assert y[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert y[len(prompt) - 1:] == response + [tok.eot_token]
    _, y_all = encode_instruction(tok, record, max_length=256, mask_prompt=False)
    assert -100 not in y_all
    x_short, y_short = encode_instruction(tok, record, max_length=len(prompt) + 2, mask_prompt=True)
    assert len(x_short) == len(prompt) + 2 and y_short[-3:] == response[:3]


def test_masked_positions_contribute_nothing_to_the_loss():
    module = LanguageModel(tiny_gpt(context_length=256), lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.0)
    tok = build_tokenizer("bytes")
    x, y = encode_instruction(tok, {"instruction": "Say hi", "output": "hi"}, 256, mask_prompt=True)
    batch = {"input_ids": torch.tensor([x]), "labels": torch.tensor([y])}
    logits = module.model(batch["input_ids"]).detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    masked = torch.tensor(y) == -100
    assert masked.sum() > 10 and logits.grad[0, masked].abs().max() == 0
    assert logits.grad[0, ~masked].abs().max() > 0
    _, n, _ = module.stage.loss(module.model, batch)
    assert n == 3  # "h", "i", <|endoftext|>


def test_loss_is_averaged_over_response_tokens_of_the_whole_accumulated_step():
    """Two micro-batches with 2 and 12 target tokens, accumulated into one step, must give the gradient of the
    mean over all 14 tokens — not the mean of the two micro-batch means."""
    torch.manual_seed(0)
    x = torch.randint(0, 257, (2, 16))
    y1 = torch.full((1, 16), -100)
    y1[0, -2:] = x[0, -2:]
    y2 = torch.full((1, 16), -100)
    y2[0, 4:] = x[1, 4:]
    batches = [{"input_ids": x[:1], "labels": y1}, {"input_ids": x[1:], "labels": y2}]

    reference = tiny_gpt()
    logits = reference(x)
    labels = torch.cat([y1, y2])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / 14
    loss.backward()
    expected = {n: -p.grad for n, p in reference.named_parameters()}

    model = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = LanguageModel(model, lm_stage(), partial(torch.optim.SGD, lr=1.0), 0, 1, 1.0)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=None)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach() - before[n], expected[n], atol=1e-5), n


@pytest.mark.slow
def test_every_stage_runs_from_the_command_line_and_the_chain_pretrain_to_instruct(tmp_path):
    small = [o for o in TINY if not o.startswith(("model.context_length", "data.max_documents"))]
    pre = run_cli([*small, "model.context_length=320", "trainer.max_steps=10", "trainer.val_check_interval=10",
                   f"hydra.run.dir={tmp_path / 'pre'}"], cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    stage_args = ["trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
                  "trainer.limit_val_batches=4", "callbacks.progress_bar=null", "data.batch_size=4"]
    ins = run_cli(["finetune=instruct", f"init_from={ckpt}", *stage_args, "finetune.test_generations=3",
                   "finetune.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'ins'}"], cwd=tmp_path)
    assert ins.returncode == 0, ins.stderr[-3000:]
    assert "before fine-tuning: val/loss" in ins.stdout
    val = [v for _, v in sorted(read_scalars(tmp_path / "ins")["val/loss"])]
    assert val[0] > val[-1]  # fine-tuning lowered the loss of the starting checkpoint
    lines = (tmp_path / "ins" / "test_generations.jsonl").read_text().splitlines()
    assert len(lines) == 3 and set(json.loads(lines[0])) == {"instruction", "input", "reference", "generated"}
    info = torch.load(tmp_path / "ins" / "checkpoints" / "last.ckpt", weights_only=False)["llmtrain"]
    assert info["prompt_template"] == "alpaca" and info["tokenizer"] == "bytes"

    cls = run_cli(["finetune=classify", f"init_from={ckpt}", *stage_args, f"hydra.run.dir={tmp_path / 'cls'}"],
                  cwd=tmp_path)
    assert cls.returncode == 0, cls.stderr[-3000:]
    assert "test/acc" in cls.stdout and "majority class" in cls.stdout
    info = torch.load(tmp_path / "cls" / "checkpoints" / "last.ckpt", weights_only=False)["llmtrain"]
    assert info["stage"] == "classify" and info["label_names"] == ["devil", "jargon"]


@pytest.mark.slow
def test_stage_and_data_must_agree(tmp_path):
    result = run_cli(["finetune=classify", "data=embedded"], cwd=tmp_path)
    assert result.returncode == 2
    assert "the classify stage trains on a ClassifyDataModule" in result.stderr.strip().splitlines()[-1]


def test_hub_presets_load_local_folders_of_the_same_shape(tmp_path):
    """data=sms_spam and data=alpaca call datasets.load_dataset(<name>); local folders in the Hub's layout with
    the real column names and types take the same path."""
    import datasets

    spam = tmp_path / "sms_spam" / "plain_text"
    spam.mkdir(parents=True)
    features = datasets.Features({"sms": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["ham", "spam"])})
    rows = {"sms": [f"message {i} {'WIN A PRIZE' if i % 4 == 0 else 'see you'}" for i in range(200)],
            "label": [int(i % 4 == 0) for i in range(200)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(spam / "train-00000-of-00001.parquet"))
    dm = make_datamodule("sms_spam", path=str(tmp_path / "sms_spam"), tokenizer="bytes", context_length=64)
    dm.setup()
    assert dm.label_names == ["ham", "spam"]
    train_labels = [label for _, label in dm.sets["train"].items]
    assert train_labels.count(0) == train_labels.count(1)  # balanced by undersampling

    alpaca = tmp_path / "alpaca" / "data"
    alpaca.mkdir(parents=True)
    recs = {"instruction": [f"Add {i} and 1." for i in range(100)], "input": ["" if i % 2 else "x" for i in range(100)],
            "output": [str(i + 1) for i in range(100)], "text": ["..."] * 100}
    datasets.Dataset.from_dict(recs).to_parquet(str(alpaca / "train-00000-of-00001.parquet"))
    dm = make_datamodule("alpaca", path=str(tmp_path / "alpaca"), tokenizer="gpt2", context_length=128)
    dm.setup()
    assert sum(len(dm.sets[s]) for s in ("train", "val", "test")) == 100


@pytest.mark.slow
def test_loss_tokens_command_shows_what_carries_loss(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmtrain.loss_tokens", 'instruction=Define "cat".',
                          "output=A small animal.", "max_length=40"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("39 positions, 5 carry loss")
    assert [ln.split()[-1] for ln in lines[1:-1]].count("loss") == 5 and "<|endoftext|>" in lines[-2]
    bad = subprocess.run([sys.executable, "-m", "llmtrain.loss_tokens", "record=99999"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: record=99999 is out of range")


@pytest.mark.slow
def test_lora_stage_trains_adapters_only_and_saves_them(tmp_path):
    small = [o for o in TINY if not o.startswith(("model.context_length", "data.max_documents"))]
    pre = run_cli([*small, "model.context_length=320", "trainer.max_steps=4", "trainer.val_check_interval=4",
                   f"hydra.run.dir={tmp_path / 'pre'}"], cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    args = ["lora=default", f"init_from={tmp_path / 'pre'}", "trainer.accelerator=cpu", "trainer.max_steps=4",
            "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "callbacks.progress_bar=null",
            "data.batch_size=4"]
    instruct = ["finetune=instruct", "finetune.test_generations=2", "finetune.max_new_tokens=4"]
    ins = run_cli([*args, *instruct, f"hydra.run.dir={tmp_path / 'lora'}"], cwd=tmp_path)
    assert ins.returncode == 0, ins.stderr[-3000:]
    assert "instruct: trainable params" in ins.stdout + ins.stderr
    fraction = read_hparams(tmp_path / "lora")["model.trainable_fraction"]  # in TensorBoard's HPARAMS tab
    assert 0 < fraction < 0.2
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "llmtrain_adapter.json").read_text())["base"] == str(tmp_path / "pre")
    check_hf_adapter(tmp_path / "pre" / "hf", tmp_path / "lora", "lm")

    cls = run_cli([*args, "finetune=classify", "data=classify_embedded", f"hydra.run.dir={tmp_path / 'c'}"],
                  cwd=tmp_path)
    assert cls.returncode == 0, cls.stderr[-3000:]
    assert "test/acc" in cls.stdout
    check_hf_adapter(tmp_path / "pre" / "hf", tmp_path / "c", "classify")

    bad = run_cli([*args, *instruct, "finetune.lora.target_modules=[attn.qkvv]", f"hydra.run.dir={tmp_path / 'bad'}"],
                  cwd=tmp_path)
    assert bad.returncode == 2 and "'attn.qkvv' matches no linear layer" in bad.stderr.strip().splitlines()[-1]


def check_hf_adapter(base_hf: Path, run_dir: Path, task: str) -> None:
    """A LoRA run's hf_adapter names its base's Hugging Face export, and peft on transformers' GPT-2 with it
    computes what the run's own merged export does."""
    import transformers
    from peft import PeftModel

    config = json.loads((run_dir / "hf_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_hf.resolve())
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if task == "classify":
            base = transformers.GPT2ForSequenceClassification.from_pretrained(base_hf, num_labels=2, pad_token_id=256)
            merged = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "hf").eval()
        else:
            base = transformers.GPT2LMHeadModel.from_pretrained(base_hf)
            merged = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
        adapted = PeftModel.from_pretrained(base, run_dir / "hf_adapter").eval()
        torch.testing.assert_close(adapted(x).logits, merged(x).logits, atol=1e-4, rtol=0)
