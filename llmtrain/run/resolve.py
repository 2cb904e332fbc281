"""Resolve a composed config into the run it describes, before anything is built; then check it.

The resolved run is what the run will really use: the model node resolved against `init_from` (its architecture,
with the node's values applied where they change no weight shape), the tokenizer the weights were trained with,
the stage built from its YAML, the sequence length, the accumulation that `tokens_per_step` implies, the precision
`auto` stands for on this machine. `resolve_run` returns it, or raises one UserError that lists every problem of
the resolving and of the checks (checks.py), each naming the key and the fix. Only `describe` of init_from is read
here (its config, never its weights).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields, replace

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from llmtrain.data.chat_template import chat_tokenizer
from llmtrain.data.tokenizer import (
    CHOOSE,
    build_tokenizer,
    is_file_tokenizer,
    same_tokenizer,
    split_added,
    tokenizer_path,
)
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.gpt2 import GPT2_NAMES
from llmtrain.interop.pretrained import describe
from llmtrain.model.gpt import GPTConfig
from llmtrain.run.checks import FREE_KEYS, check_run
from llmtrain.stages.base import Stage
from llmtrain.training.hardware import choose_precision

# model keys whose null means something when there is no init_from to take the value from: a value derived from the
# others (n_kv_heads, head_dim, mlp_hidden), or none (rope_scaling: plain RoPE)
NULL_MEANS = ("n_kv_heads", "head_dim", "mlp_hidden", "rope_scaling")


@dataclass(frozen=True)
class ResolvedRun:
    """The values a run uses that the composed config alone does not state."""

    model_config: GPTConfig
    start: ModelInfo | None  # what init_from holds (None: random weights)
    tokenizer: str  # gpt2, bytes, or the absolute path of a tokenizer.json
    stage: Stage  # built from cfg.finetune
    context_length: int  # tokens per training sequence: the window (text) or the longest record (tables)
    accumulate: int  # micro-batches per optimizer step
    precision: str | int  # as Lightning takes it
    precision_reason: str  # why: printed at the start of a run


def resolve_run(cfg: DictConfig) -> ResolvedRun:
    """The resolved run of `cfg`, or one UserError listing every problem (joined by '; ')."""
    problems: list[str] = []
    start = describe(str(cfg.init_from)) if cfg.init_from else None
    model_config = effective_model_config(OmegaConf.to_container(cfg.model), start, cfg.init_from, problems)
    tokenizer = effective_tokenizer(cfg.data.tokenizer, start, cfg.init_from, problems)
    stage_class, stage = build_stage(cfg.finetune, problems)
    if tokenizer and stage_class is not None and stage_class.adds_template_tokens and not problems:
        tokenizer = chat_tokenizer(tokenizer, cfg.data.chat_template)  # the special tokens the template needs
        model_config = with_vocabulary(model_config, tokenizer)
    context_length = model_config.context_length if model_config else 1
    if cfg.data.get("context_length") is not None:  # a window shorter than the model's (text data)
        context_length = cfg.data.context_length
    accumulate = accumulation_steps(cfg, context_length, problems)
    problems += check_run(cfg, model_config, tokenizer, stage_class, context_length)
    if problems:
        raise UserError("; ".join(problems))
    precision, why = choose_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    return ResolvedRun(model_config, start, tokenizer, stage, context_length, accumulate, precision, why)


def build_stage(node: DictConfig, problems: list[str]) -> tuple[type[Stage] | None, Stage | None]:
    """(the stage class that cfg.finetune names, the stage built from it); its keys are bound to the class's
    arguments first, so that a key it does not take or one it needs is named (as torchtune checks its configs); the
    stage's own checks raise ValueError. None where a problem was found."""
    target = node.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - hydra raises ImportError, ValueError or its own for a path that names nothing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        problems.append(f"finetune._target_={target} is not a stage (a subclass of llmtrain.stages.base.Stage): "
                        f"choose a stage with finetune=<a file of conf/finetune>")
        return None, None
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD}
    given = [k for k in node if not k.startswith("_")]
    unknown = [k for k in given if k not in params]
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given]
    if unknown:
        problems.append(f"finetune.{unknown[0]} is not a setting of the {cls.name} stage: drop it (its settings are "
                        f"{', '.join(params)})")
    if missing:
        problems.append(f"the {cls.name} stage needs finetune.{', finetune.'.join(missing)}: set "
                        f"{' '.join(f'finetune.{k}=...' for k in missing)}, or choose its own preset "
                        f"(finetune={cls.name})")
    if unknown or missing:
        return cls, None
    try:
        return cls, instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            problems.append(str(e.__cause__))
            return cls, None
        raise


def with_vocabulary(config: GPTConfig | None, tokenizer: str) -> GPTConfig | None:
    """The model config with room for the special tokens added to its tokenizer (its embedding and head grow)."""
    n_vocab = build_tokenizer(tokenizer).n_vocab
    if config is None or not split_added(tokenizer)[1] or n_vocab <= config.vocab_size:
        return config
    return replace(config, vocab_size=n_vocab)


def effective_model_config(node: dict, start: ModelInfo | None, init_from: str | None,
                           problems: list[str]) -> GPTConfig | None:
    """cfg.model as a GPTConfig; with init_from, the checkpoint's architecture with the node's non-null values
    applied where they change no weight shape (drop_rate, a shorter context_length) and refused where they would.
    Problems are appended; None when no config can be made."""
    settings = [f.name for f in fields(GPTConfig)]
    unknown = [k for k in node if k not in settings]
    if unknown:
        problems.append(f"model.{unknown[0]} is not a model setting: drop it (the settings are {', '.join(settings)})")
        return None
    if start is None:
        unset = [k for k, v in node.items() if v is None and k not in NULL_MEANS]
        if unset:
            problems.append(f"model.{unset[0]} is null: model=checkpoint takes the architecture of init_from, "
                            f"which is not set: give init_from=<run dir, checkpoint, Hugging Face dir or Hub name>, "
                            f"or choose a model to train from scratch (e.g. model=gpt_tiny)")
            return None
        return _config(node, problems)
    saved = asdict(start.model_config)
    changed, refused = {}, []
    for key, value in node.items():
        if value is None or value == saved[key]:
            continue
        if key in FREE_KEYS or (key == "context_length" and value < saved[key]):
            changed[key] = value
        else:
            refused.append(f"model.{key}={value} but init_from={init_from} has {saved[key]}")
    if refused:
        preset = start.extra.get("model_name") or _gpt2_preset(start.model_config)
        fix = f"model=checkpoint (its architecture){f' or model={preset}' if preset else ''}"
        problems.append(f"{', '.join(refused)}: choose {fix}, or drop the model override")
        return None
    return _config({**saved, **changed}, problems)


def _config(values: dict, problems: list[str]) -> GPTConfig | None:
    try:
        return GPTConfig(**values)
    except ValueError as e:  # GPTConfig's own checks, one line each
        problems += str(e).split("; ")
    return None


def _gpt2_preset(config: GPTConfig) -> str | None:
    """The conf/model preset of a released GPT-2 with these shapes, if any."""
    shapes = {"gpt124m": (768, 12, 12), "gpt355m": (1024, 24, 16), "gpt774m": (1280, 36, 20),
              "gpt1558m": (1600, 48, 25)}
    shape = (config.emb_dim, config.n_layers, config.n_heads)
    if (config.pos_emb, config.norm, config.mlp, config.n_kv_heads) != ("learned", "layernorm", "gelu", config.n_heads):
        return None
    return next((name for name in GPT2_NAMES.values() if shapes[name] == shape and config.vocab_size == 50257), None)


def effective_tokenizer(requested: str | None, start: ModelInfo | None, init_from: str | None,
                        problems: list[str]) -> str | None:
    """data.tokenizer; null means the tokenizer of init_from's weights. Naming another one than the weights were
    trained with is refused: the ids would mean other tokens. A tokenizer.json is returned as an absolute path."""
    if (start is not None and requested is not None and start.tokenizer is not None
            and not same_tokenizer(requested, start.tokenizer)):
        problems.append(f"data.tokenizer={requested} but init_from={init_from} was trained with "
                        f"{start.tokenizer}: set data.tokenizer={start.tokenizer} (or null: the checkpoint's)")
    tokenizer = requested if requested is not None else start.tokenizer if start else None
    if tokenizer is None and start is None:
        problems.append(f"data.tokenizer is null, which means init_from's tokenizer, but init_from is not set: "
                        f"set data.tokenizer to {CHOOSE}")
    elif tokenizer is None:
        problems.append(f"data.tokenizer is null, which means init_from's tokenizer, but init_from={init_from} has "
                        f"no tokenizer.json: set data.tokenizer to the path of the tokenizer.json it was trained with")
    elif is_file_tokenizer(tokenizer):
        try:
            return str(tokenizer_path(tokenizer))
        except UserError:
            problems.append(f"data.tokenizer={tokenizer!r} is not known: choose {CHOOSE}")
            return None
    return tokenizer


def accumulation_steps(cfg: DictConfig, context_length: int, problems: list[str]) -> int:
    """trainer.accumulate_grad_batches, or derived from tokens_per_step when that is set."""
    target = cfg.tokens_per_step
    if not target:
        return cfg.trainer.accumulate_grad_batches
    if cfg.trainer.accumulate_grad_batches != 1:
        problems.append(f"tokens_per_step={target} sets the gradient accumulation itself, so "
                        f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} would be ignored: "
                        f"drop one of the two")
        return 1
    devices = cfg.trainer.devices
    if not isinstance(devices, int) or devices < 1:
        problems.append(f"tokens_per_step needs a number of devices, but trainer.devices={devices!r}: "
                        f"set trainer.devices=N")
        return 1
    per_micro_step = devices * cfg.trainer.num_nodes * cfg.data.batch_size * context_length
    if target % per_micro_step:
        problems.append(
            f"tokens_per_step={target} is not a multiple of devices x nodes x data.batch_size x context "
            f"({devices} x {cfg.trainer.num_nodes} x {cfg.data.batch_size} x {context_length} = {per_micro_step}): "
            f"choose a multiple of {per_micro_step} or change data.batch_size"
        )
        return 1
    return target // per_micro_step
