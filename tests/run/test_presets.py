"""The recipes (conf/experiment/) and debug presets (conf/debug/): each composes and passes the checks; the ones
that need the Hub run on local stand-ins of the same shape; debug=overfit learns one batch; debug=profile writes
a trace where TensorBoard's profiler tab reads it."""

import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from conftest import ROOT, TINY, compose, read_scalars, write_checkpoint

from llmtrain.data.chat_template import CHATML, chat_tokenizer
from llmtrain.errors import UserError
from llmtrain.run.resolve import resolve_run
from llmtrain.run.train import train

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (ROOT / "conf" / "debug").glob("*.yaml"))
# TINY without the length of the run, which the debug presets set
SHORT = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """Local folders shaped like what the recipes take from the Hub: a GPT-2 (random, tiny, GPT-2's vocabulary)
    in save_pretrained layout, SMS Spam (columns sms and a ClassLabel ham/spam) and Alpaca (instruction, input,
    output, text) as parquet files in the Hub's data/ layout."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2", safe_serialization=True)
    spam = datasets.Dataset.from_dict(
        {"sms": [f"WINNER!! claim your prize {i} now, call 0800" if i % 4 == 0 else f"see you at {i} tonight"
                 for i in range(120)], "label": [int(i % 4 == 0) for i in range(120)]},
        features=datasets.Features({"sms": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["ham", "spam"])}))
    spam.to_parquet(root / "sms_spam" / "data" / "train-00000-of-00001.parquet")
    records = [{"instruction": f"Add {i} and 2.", "input": "", "output": f"{i + 2}"} for i in range(80)]
    alpaca = datasets.Dataset.from_list([r | {"text": f"{r['instruction']} {r['output']}"} for r in records])
    alpaca.to_parquet(root / "alpaca" / "data" / "train-00000-of-00001.parquet")
    return {"init_from": str(root / "gpt2"), "spam": str(root / "sms_spam"), "alpaca": str(root / "alpaca"),
            "pretrain": str(write_checkpoint(root / "pretrain.ckpt")), "smollm": str(save_smollm(root / "smollm")),
            "smoltalk": str(save_smoltalk(root / "smoltalk"))}


# SmolLM-Instruct's kind of template: ChatML with a system message of its own when the conversation has none
SMOLLM_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                   "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}{{ "
                   "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_smollm(folder: Path) -> Path:
    """SmolLM-135M-Instruct's shape, tiny: a random tied LlamaForCausalLM with grouped key/value heads, a byte-level
    tokenizer.json whose special tokens are SmolLM's (<|endoftext|>, <|im_start|>, <|im_end|>) and a
    tokenizer_config.json with its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llmtrain.data.tokenizer import byte_decoder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    table = {b: c for c, b in byte_decoder().items()}
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": SMOLLM_TEMPLATE}))
    return folder


def save_smoltalk(folder: Path) -> Path:
    """SmolTalk's layout: a README naming the config everyday-conversations and its files, messages and a topic."""
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: everyday-conversations\n  data_files:\n"
                                      "  - split: train\n    path: data/train.jsonl\n---\n")
    rows = [{"full_topic": "numbers", "messages": [{"role": "user", "content": f"What comes after {i}?"},
                                                   {"role": "assistant", "content": f"{i + 1}."}]} for i in range(80)]
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def local(experiment: str, stand_ins: dict[str, str]) -> list[str]:
    """The overrides that point a recipe at the local stand-ins instead of the Hub (and at a pretraining
    checkpoint where the recipe takes one)."""
    if experiment in ("spam_gpt2", "lora_spam"):
        return [f"init_from={stand_ins['init_from']}", f"data.path={stand_ins['spam']}"]
    if experiment == "alpaca_gpt2_medium":  # its benchmarks read the Hub too
        return [f"init_from={stand_ins['init_from']}", f"data.path={stand_ins['alpaca']}", "eval.tasks=[]"]
    if experiment == "chat_from_pretrain":  # a bytes checkpoint of context 64: most answers are cut off
        return [f"init_from={stand_ins['pretrain']}", "data.max_dropped_fraction=1.0"]
    if experiment == "smollm_chat":
        return [f"init_from={stand_ins['smollm']}", f"data.path={stand_ins['smoltalk']}"]
    return []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_and_passes_the_checks(experiment, stand_ins, tmp_path):
    cfg = compose([f"experiment={experiment}", *local(experiment, stand_ins)], tmp_path)
    eff = resolve_run(cfg)
    tokenizer = {"chat_from_pretrain": chat_tokenizer("bytes", "chatml"),
                 "smollm_chat": str(Path(stand_ins["smollm"], "tokenizer.json").resolve())}.get(experiment, "gpt2")
    assert cfg.trainer.max_steps > 0 and eff.tokenizer == tokenizer


@pytest.mark.parametrize("preset", DEBUG)
def test_every_debug_preset_composes_with_a_recipe_and_passes_the_checks(preset, stand_ins, tmp_path):
    for base in ([], ["experiment=lora_spam", *local("lora_spam", stand_ins)]):
        resolve_run(compose([*base, f"debug={preset}"], tmp_path))


def test_the_recipes_hold_the_published_settings(tmp_path):
    gpt2 = compose(["experiment=gpt2_124m_fineweb"], tmp_path)
    assert (gpt2.model.emb_dim, gpt2.model.n_layers, gpt2.model.context_length) == (768, 12, 1024)
    assert gpt2.data.path == "HuggingFaceFW/fineweb-edu" and gpt2.tokens_per_step == 524288
    assert (gpt2.optimizer.lr, list(gpt2.optimizer.betas), gpt2.optimizer.weight_decay) == (6e-4, [0.9, 0.95], 0.1)
    assert (gpt2.scheduler.warmup_steps, gpt2.scheduler.min_lr_ratio, gpt2.trainer.max_steps) == (715, 0.1, 19073)
    assert gpt2.trainer.precision == "bf16-mixed" and gpt2.perf.compile
    assert resolve_run(gpt2).accumulate == 524288 // (64 * 1024)  # one device: 8 micro-batches a step
    assert 19073 * 524288 == pytest.approx(10e9, rel=0.001)  # ~10B tokens

    spam = compose(["experiment=spam_gpt2"], tmp_path)
    assert (spam.init_from, spam.data.path, spam.finetune._target_, spam.finetune.train_blocks) == (
        "gpt2", "ucirvine/sms_spam", "llmtrain.stages.classify.Classify", "last")
    assert (spam.optimizer.lr, spam.optimizer.weight_decay, spam.data.batch_size, spam.data.balance) == (
        5e-5, 0.1, 8, True)
    lora = compose(["experiment=lora_spam"], tmp_path)
    assert lora.finetune.lora.r == 16 and lora.finetune.lora.alpha / lora.finetune.lora.r == 16  # the book's alpha
    assert lora.finetune._target_ == spam.finetune._target_ and lora.data.path == spam.data.path
    assert lora.optimizer.lr == 5e-5 and lora.finetune.train_blocks == "none"
    alpaca = compose(["experiment=alpaca_gpt2_medium"], tmp_path)
    assert (alpaca.init_from, alpaca.data.path, alpaca.finetune._target_, alpaca.data.mask_prompt) == (
        "gpt2-medium", "tatsu-lab/alpaca", "llmtrain.stages.instruct.Instruct", True)
    assert (alpaca.optimizer.lr, alpaca.optimizer.weight_decay, alpaca.data.batch_size) == (5e-5, 0.1, 8)
    # the benchmarks they quote (or measure before and after), once at the end
    assert (list(gpt2.eval.tasks), gpt2.eval.every_n_steps) == (["hellaswag"], 19073)
    assert (list(alpaca.eval.tasks), alpaca.eval.every_n_steps) == (["hellaswag", "arc_easy"], 12480)

    fast = compose(["debug=fast"], tmp_path)
    assert fast.logger is None and fast.callbacks.last_checkpoint is None and fast.trainer.max_steps == 3
    anomaly = compose(["debug=anomaly", "perf.compile=true"], tmp_path)
    assert anomaly.trainer.detect_anomaly and anomaly.trainer.precision == "32-true"
    assert not compose(["experiment=gpt2_124m_fineweb", "debug=anomaly"], tmp_path).perf.compile


def test_max_train_samples_below_one_batch_is_refused(tmp_path):
    assert resolve_run(compose([*TINY, "data.max_train_samples=8"], tmp_path))  # one batch of 8: allowed
    with pytest.raises(UserError, match=r"^data.max_train_samples=4 is less than one batch of data.batch_size=8: "):
        resolve_run(compose([*TINY, "data.max_train_samples=4"], tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["spam_gpt2", "lora_spam", "alpaca_gpt2_medium"])
def test_the_hub_recipes_run_on_local_stand_ins(experiment, stand_ins, tmp_path):
    cfg = compose([f"experiment={experiment}", *local(experiment, stand_ins), "debug=fast",
                   "trainer.accelerator=cpu", "data.max_length=96", "callbacks.progress_bar=null",
                   *(["finetune.test_generations=2", "finetune.max_new_tokens=4"] if "alpaca" in experiment else [])],
                  tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 3
    assert ("test/acc" in metrics) == (experiment != "alpaca_gpt2_medium")
    assert (tmp_path / "adapter").is_dir() == (experiment == "lora_spam")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["chat_from_pretrain", "smollm_chat"])
def test_the_chat_recipes_run_on_a_pretraining_checkpoint_and_a_local_smollm(experiment, stand_ins, tmp_path):
    """chat_from_pretrain adds ChatML's tokens to the checkpoint's tokenizer and grows it; smollm_chat keeps the
    model's own template and vocabulary. The export carries the template either way."""
    cfg = compose([f"experiment={experiment}", *local(experiment, stand_ins), "debug=fast", "trainer.accelerator=cpu",
                   "callbacks.progress_bar=null", "trainer.precision=32-true"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0 < metrics["val/loss"] < 20
    exported = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    vocab = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert (exported, vocab) == ((CHATML, 259) if experiment == "chat_from_pretrain" else (SMOLLM_TEMPLATE, 259))


@pytest.mark.slow
def test_debug_overfit_learns_one_batch(tmp_path):
    cfg = compose([*SHORT, "debug=overfit", "optimizer=adamw", "optimizer.lr=1e-2", "trainer.max_steps=70",
                   "trainer.val_check_interval=70"], tmp_path)
    assert cfg.data.max_train_samples == cfg.data.batch_size == 8
    train(cfg)
    losses = [v for _, v in sorted(read_scalars(tmp_path)["train/loss"])]
    assert losses[0] > 4 and losses[-1] < 0.5, losses  # ln(257) = 5.55 at the start; the batch is learnt


@pytest.mark.slow
def test_debug_profile_writes_a_trace_that_tensorboard_reads(tmp_path):
    cfg = compose([*SHORT, "debug=profile"], tmp_path)
    train(cfg)
    traces = sorted((tmp_path / "tensorboard").glob("*.pt.trace.json"))
    assert any("training_step" in t.name for t in traces), sorted(p.name for p in tmp_path.rglob("*"))
    trace = json.loads(traces[0].read_text())
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])  # operators were recorded
    assert (tmp_path / "tensorboard" / "fit-profile.txt").is_file()  # the operator table, not on the console
    assert Path(tmp_path / "metrics.json").is_file()
