"""Every check of a composed config, on the effective config, before anything is built.

The effective config is what the run will really use: the model node resolved against `init_from` (its
architecture, with the node's values applied where they change no weight shape), the tokenizer the weights
were trained with, the window length, the accumulation that `tokens_per_step` implies, the precision `auto`
stands for on this machine. `check_config` computes it and reports every problem at once, one line, each
naming the key and the fix. Only `describe` of init_from is read here (its config, never its weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from omegaconf import DictConfig, ListConfig, OmegaConf

from llmtrain.data.choice import SHIPPED_FRACTIONS, SOURCES, TABLE_SOURCES, choose_source
from llmtrain.data.tokenizer import CHOOSE, build_tokenizer, is_file_tokenizer, same_tokenizer, tokenizer_path
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.gpt2 import GPT2_NAMES
from llmtrain.interop.pretrained import describe
from llmtrain.model.gpt import GPTConfig
from llmtrain.training.hardware import choose_precision, hardware_problems

# model keys a checkpoint's weights do not fix: the run's value replaces the checkpoint's. rope_theta and norm_eps
# change no weight's shape either, but the function the weights were trained for: like shapes, they are refused.
FREE_KEYS = ("drop_rate",)
# model keys whose null means a value derived from the others (when there is no init_from to take it from)
DERIVED_KEYS = ("n_kv_heads", "mlp_hidden")
# the data module each task trains on, and the presets that provide one
DATA_FOR_TASK = {"lm": ("TextDataModule", "data=embedded or data=text"),
                 "instruct": ("InstructDataModule", "data=instruct_embedded or data=alpaca"),
                 "classify": ("ClassifyDataModule", "data=classify_embedded or data=sms_spam"),
                 "dpo": ("PreferenceDataModule", "data=preference_embedded or data=truthy_dpo")}
TRAIN_BLOCKS_CHOICES = "all, last, head, none, or N (the last N blocks)"
# the finetune keys each task reads beyond name, task, train_blocks and lora, and the stage that sets them
STAGE_KEYS = {"lm": ("sample_prompt", "sample_tokens"),
              "instruct": ("num_samples", "sample_tokens", "test_generations", "max_new_tokens"), "classify": (),
              "dpo": ("beta", "num_samples", "sample_tokens")}
STAGE_FOR_TASK = {"lm": "finetune=pretrain", "instruct": "finetune=instruct (or finetune=lora)",
                  "classify": "finetune=classify (or finetune=lora finetune.task=classify)",
                  "dpo": "finetune=dpo (with finetune.lora=... for adapters)"}


@dataclass(frozen=True)
class Effective:
    """The values a run uses that the composed config alone does not state."""

    model_config: GPTConfig
    start: ModelInfo | None  # what init_from holds (None: random weights)
    tokenizer: str  # gpt2, bytes, or the absolute path of a tokenizer.json
    context_length: int  # tokens per training sequence: the window (lm) or the longest record (tables)
    accumulate: int  # micro-batches per optimizer step
    precision: str | int  # as Lightning takes it
    precision_reason: str  # why: printed at the start of a run


def check_config(cfg: DictConfig) -> Effective:
    """The effective config of `cfg`, or one UserError listing every problem (joined by '; ')."""
    problems: list[str] = []
    start = describe(str(cfg.init_from)) if cfg.init_from else None
    model_config = effective_model_config(OmegaConf.to_container(cfg.model), start, cfg.init_from, problems)
    tokenizer = effective_tokenizer(cfg.data.tokenizer, start, cfg.init_from, problems)
    task = cfg.finetune.task
    context_length = model_config.context_length if model_config else 1
    if task in DATA_FOR_TASK:
        wanted, examples = DATA_FOR_TASK[task]
        missing = [f"finetune.{key}" for key in STAGE_KEYS[task] if key not in cfg.finetune]
        if missing:
            problems.append(f"finetune.task={task} needs {', '.join(missing)}, which finetune={cfg.finetune.name} does "
                            f"not set: choose {STAGE_FOR_TASK[task]}")
        if not str(cfg.data._target_).endswith(wanted):
            problems.append(f"finetune.task={task} needs a {wanted} but data is {cfg.data._target_}: choose {examples}")
        else:
            problems += unread_data_values(cfg.data)
            if task == "lm" and cfg.data.context_length is not None:
                context_length = cfg.data.context_length
                if model_config and context_length > model_config.context_length:
                    problems.append(f"data.context_length={context_length} is larger than model.context_length="
                                    f"{model_config.context_length}: lower data.context_length or raise "
                                    f"model.context_length")
                if context_length < 1:
                    problems.append(f"data.context_length must be positive, got {context_length}")
    else:
        problems.append(f"finetune.task={task!r} is not known: choose one of {', '.join(DATA_FOR_TASK)}")
    n_vocab = _vocabulary_size(tokenizer, problems) if tokenizer and model_config else None
    if n_vocab is not None and model_config.vocab_size < n_vocab:
        problems.append(f"model.vocab_size={model_config.vocab_size} is smaller than the {tokenizer} "
                        f"tokenizer's {n_vocab} ids: set model.vocab_size={n_vocab} (or larger)")
    train_blocks = cfg.finetune.train_blocks
    if train_blocks not in ("all", "last", "head", "none") and not (
            isinstance(train_blocks, int) and model_config and 0 <= train_blocks <= model_config.n_layers):
        choices = f"0..{model_config.n_layers} or " if model_config and isinstance(train_blocks, int) else ""
        problems.append(f"finetune.train_blocks={train_blocks!r} is not one of {choices}{TRAIN_BLOCKS_CHOICES}")
    if task == "dpo" and "beta" in cfg.finetune:
        check_dpo(cfg.finetune, problems)
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    elif cfg.data.max_train_samples is not None and cfg.data.max_train_samples < cfg.data.batch_size:
        problems.append(f"data.max_train_samples={cfg.data.max_train_samples} is less than one batch of "
                        f"data.batch_size={cfg.data.batch_size}: set data.max_train_samples to "
                        f"{cfg.data.batch_size} or more (or null: the whole training split)")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps must be a positive number of optimizer steps, got {cfg.trainer.max_steps}")
    if cfg.scheduler.warmup_steps < 0:
        problems.append(f"scheduler.warmup_steps must be >= 0, got {cfg.scheduler.warmup_steps}")
    if not 0 <= cfg.scheduler.min_lr_ratio <= 1:
        problems.append(f"scheduler.min_lr_ratio must lie in [0, 1] (the lr at the end as a share of the peak), "
                        f"got {cfg.scheduler.min_lr_ratio}")
    if cfg.checkpoint_every is None or cfg.checkpoint_every < 1:
        problems.append(f"checkpoint_every must be a positive number of optimizer steps, got {cfg.checkpoint_every}")
    if "overfit_batches" in cfg.trainer:
        problems.append("trainer.overfit_batches is not supported (llmtrain's loaders keep their place for exact "
                        "resume): to train on a small subset, set data.max_documents=N")
    accumulate = accumulation_steps(cfg, context_length, problems)
    problems += hardware_problems(cfg.trainer)
    if problems:
        raise UserError("; ".join(problems))
    precision, why = choose_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    return Effective(model_config, start, tokenizer, context_length, accumulate, precision, why)


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
        unset = [k for k, v in node.items() if v is None and k not in DERIVED_KEYS]
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


def unread_data_values(data: DictConfig) -> list[str]:
    """Values of the data node that the source it reads would not use: each one is refused, never ignored.
    (data.path with source embedded is read: its extension names the source.)"""
    tables = not str(data._target_).endswith("TextDataModule")
    path = OmegaConf.to_container(data.path) if isinstance(data.path, ListConfig) else data.path
    try:
        source = choose_source(data.source, path, TABLE_SOURCES if tables else SOURCES)
    except UserError as e:
        return [str(e)]
    problems = []
    if data.subset is not None and source != "hub":
        problems.append(f"data.subset={data.subset!r} names a configuration of a Hub dataset, but this run reads "
                        f"data.source={source}: drop data.subset (or set data.source=hub)")
    if data.split != "train" and source != "hub":
        held_out = "data.val_fraction and data.test_fraction hold out rows" if tables else \
            "data.val_fraction holds out documents"
        problems.append(f"data.split={data.split!r} picks a split of a Hub dataset, but data.source={source} has one "
                        f"split (train): drop data.split ({held_out})")
    if not tables and data.sample_by is not None and source != "text":
        problems.append(f"data.sample_by={data.sample_by} splits text files into documents, but data.source={source} "
                        f"reads a document per row: drop data.sample_by (or set it to null)")
    if not tables and data.sample_by is None and source == "text":
        problems.append(f"data.path={path!r} is read as text files, which need data.sample_by: set "
                        f"data.sample_by=paragraph (or line, document), or choose data=text")
    if tables and source == "embedded":
        changed = [f"data.{key}={data[key]}" for key, value in SHIPPED_FRACTIONS.items() if data[key] != value]
        if changed:
            shipped = ", ".join(f"{k}={v}" for k, v in SHIPPED_FRACTIONS.items())
            problems.append(f"{', '.join(changed)} would divide a table of your own (data.path), but the shipped data "
                            f"comes in fixed splits ({shipped}, by headword): drop it, or give your table with "
                            f"data.path")
    return problems


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


def _vocabulary_size(tokenizer: str, problems: list[str]) -> int | None:
    """The number of ids of a tokenizer that effective_tokenizer accepted (None if it cannot be opened)."""
    try:
        return build_tokenizer(tokenizer).n_vocab
    except UserError as e:  # a tokenizer.json that is not one, or has no end-of-text token
        problems.append(str(e))
        return None


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


def check_dpo(finetune: DictConfig, problems: list[str]) -> None:
    """DPO's own settings (their presence is checked with STAGE_KEYS)."""
    beta = finetune.beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        problems.append(f"finetune.beta must be positive (how far the policy may move from the reference; 0.1 is "
                        f"usual), got {beta}")


def check_resume(info: ModelInfo, model_config: GPTConfig, stage: str, ckpt_path: str,
                 init_from: str | None = None) -> None:
    """Resuming needs the checkpoint's stage and architecture, and for DPO its init_from (the reference model, which
    checkpoints do not hold): name what differs, with the value to use."""
    if info.stage is not None and info.stage != stage:
        raise UserError(f"ckpt_path={ckpt_path} was written by finetune={info.stage}, this run is finetune={stage}: "
                        f"resume with finetune={info.stage} (and its data), or use init_from= to start a new "
                        f"stage from its weights")
    if info.task == "dpo" and info.init_from != init_from:
        raise UserError(f"ckpt_path={ckpt_path} was trained against the reference init_from={info.init_from}, this "
                        f"run has init_from={init_from}: resume with init_from={info.init_from} (DPO's reference is "
                        f"the starting weights)")
    saved, ours = asdict(info.model_config), asdict(model_config)
    differ = [f"model.{k}={saved[k]} (this run: {ours[k]})" for k in ours
              if saved[k] != ours[k] and k not in FREE_KEYS]  # dropout holds no weights
    if differ:
        raise UserError(f"ckpt_path={ckpt_path} holds another architecture: {', '.join(differ)}; resume with "
                        f"the checkpoint's model settings, or use init_from= to fine-tune from its weights")

