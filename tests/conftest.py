"""Shared helpers: tiny configs, composing the real Hydra config, running the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Offline and isolated: no Hub look-ups, token caches in one folder for the whole session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A model and run small enough for seconds on a 2-core CPU: byte tokenizer, 2 layers of width 32.
TINY = [
    "data.tokenizer=bytes",
    "model.vocab_size=257",
    "model.context_length=32",
    "model.emb_dim=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "data.batch_size=8",
    "data.max_documents=400",
    "trainer.accelerator=cpu",
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "trainer.log_every_n_steps=5",
    "trainer.limit_val_batches=20",
    "scheduler.warmup_steps=5",
    "callbacks.progress_bar=null",
    "finetune.sample_tokens=8",
]


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("token-cache")
    os.environ["LLMTRAIN_CACHE"] = str(cache)
    return cache


def compose(overrides: list[str], run_dir: Path):
    """The real config from conf/, as Hydra composes it for the command line, with run_dir set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmtrain.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[*overrides, f"run_dir={run_dir}"])


def subprocess_env(extra_paths: tuple[Path, ...] = ()) -> dict[str, str]:
    """The environment for a child process that runs this checkout's llmtrain (whatever is installed), with
    extra_paths importable too (e.g. tests/ for a test's callback)."""
    paths = [str(ROOT), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_cli(args: list[str], cwd: Path, timeout: float = 300, module: str = "llmtrain",
            extra_paths: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m llmtrain ARGS` in a fresh process, as a user would type it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=subprocess_env(extra_paths),
                          capture_output=True, text=True, timeout=timeout)


def make_datamodule(preset: str, **keys):
    """The data module of conf/data/<preset>.yaml as the recipe builds it, with `keys` in place of the preset's
    values (the recipe's own: context_length, tokenizer, seed)."""
    from llmtrain.run.train import build

    cfg = compose([f"data={preset}"], Path("unused"))
    return build(cfg.data, **({"context_length": 128, "tokenizer": "gpt2", "seed": 0} | keys))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a run's TensorBoard events -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def read_hparams(run_dir: Path) -> dict[str, float | str]:
    """The values a run recorded for TensorBoard's HPARAMS tab (its last session start), name -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    found: dict[str, float | str] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME).get(metadata.SESSION_START_INFO_TAG)
        if content:
            start = metadata.parse_session_start_info_plugin_data(content)
            found = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return found


def write_checkpoint(path: Path, n_layers: int = 2, **meta) -> Path:
    """A checkpoint as the pretraining stage writes it: a random bytes-tokenizer GPT (width 32, context 64) and its
    llmtrain record (`meta` added)."""
    from dataclasses import asdict

    import torch

    from llmtrain.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=n_layers,
                          tie_weights=True))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": "bytes",
                             "stage": "pretrain", **meta}}, path)
    return path


HOSTILE_GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10**9, "n_positions": 1024,
                "n_embd": 64, "n_head": 2, "n_layer": 10**6}  # about 114 billion parameters: no machine loads it


def write_hostile_folder(path: Path) -> Path:
    """A Hugging Face GPT-2 folder whose config.json states sizes that no memory holds (and no weights at all:
    loading must be refused before it looks for them)."""
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(HOSTILE_GPT2))
    return path


def lm_stage(loss_chunk: int | None = None, sample_prompt: str | None = None, sample_tokens: int = 0):
    """The pretraining stage, as conf/finetune/pretrain.yaml builds it, for tests that run a LanguageModel."""
    from llmtrain.stages.pretrain import Pretrain

    return Pretrain(train_blocks="all", lora=None, loss_chunk=loss_chunk, sample_prompt=sample_prompt,
                    sample_tokens=sample_tokens)


def build_script():
    """scripts/build_datasets.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_datasets", ROOT / "scripts" / "build_datasets.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["build_datasets"] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    return script


def trainable_names(model) -> set[str]:
    """The names of a model's parameters that train."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- chat: templates and conversations shared by the data, stage and export tests ----

# Llama 3 Instruct's template (BOS written by the template, turns closed by <|eot_id|>)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def conversation(*turns: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


CONVERSATIONS = [
    conversation("Hi", "Hello"),
    conversation("Hi", "Hello", system="Be brief."),
    conversation("Define \"foo\".", "A metasyntactic variable.", "And bar?", "Its companion.", system="Jargon."),
    conversation("naïve café ☕?", "日本語 👍🏽, déjà vu"),
    conversation("a", "b", "c", "d", "e", "f"),
    conversation("Hi", "  spaced  \n\n", system=""),
    conversation("line\nbreaks\n", "more\n\nlines"),
    conversation("Hi", "Hello", "And then?"),
    conversation("<b>html & \"quotes\"</b>", "{{ not jinja }} {% raw %}"),
    conversation("x" * 50, "y" * 50, system="S" * 20),
]


def write_llama3_tokenizer(folder: Path) -> Path:
    """A tiny Llama-3-style tokenizer.json in folder (byte-level BPE, its specials, a post-processor adding
    <|begin_of_text|>) and a tokenizer_config.json holding the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from llmtrain.data.tokenizer import byte_decoder

    table = {b: c for c, b in byte_decoder().items()}
    vocab = {table[b]: b for b in range(256)} | {"Ġt": 256, "he": 257, "Ġthe": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA3_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 259)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
