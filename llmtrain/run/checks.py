"""Every check of a resolved run (resolve.py builds it from the composed config), before anything is built: the
model, tokenizer, stage and data fit together, every value given is read, the numbers are in range. Each problem is
one line naming the key and the fix; resolve_run reports them all at once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict

from omegaconf import DictConfig, ListConfig, OmegaConf

from llmtrain.data.choice import SHIPPED_FRACTIONS, SOURCES, TABLE_SOURCES, choose_source
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.digest import changed_weights
from llmtrain.model.gpt import GPTConfig
from llmtrain.stages.base import Stage
from llmtrain.training.hardware import hardware_problems, is_sharded

# model keys a checkpoint's weights do not fix: the run's value replaces the checkpoint's. rope_theta and norm_eps
# change no weight's shape either, but the function the weights were trained for: like shapes, they are refused.
FREE_KEYS = ("drop_rate",)
UNCOMPARED = ("run_dir", "ckpt_path", "resume", "logger", "callbacks", "eval")  # where a run is, how it started and
# is watched
# What a resume compares with the checkpoint's run: changing these makes it another run (refused, with the keys) ...
OTHER_RUN = ("model.", "data.tokenizer", "data.path", "data.source", "data.revision", "data.name", "data.config",
             "data.split", "data.text_column", "data.label_column", "data.context_length", "data.val_fraction",
             "init_from", "optimizer._target_", "lora.", "finetune._target_", "tokens_per_step", "seed")
# ... and these change how it goes on: refused unless resume.apply names them (then the new value applies)
APPLIABLE = ("optimizer.", "scheduler.", "finetune.", "trainer.max_steps", "trainer.accumulate_grad_batches")
TRAIN_BLOCKS_CHOICES = "all, last, head, none, or N (the last N blocks)"
# the trackers whose package is optional (the track extra): the logger's _target_ -> the package it imports
TRACKER_PACKAGES = {"llmtrain.run.trackers.MLflow": "mlflow", "llmtrain.run.trackers.Wandb": "wandb"}


def check_run(cfg: DictConfig, model_config: GPTConfig | None, tokenizer: str | None, stage: type[Stage] | None,
              context_length: int) -> list[str]:
    """The problems of a run whose parts resolved as given (None: a part that did not; its problem is reported
    already). `stage`: the stage's class (its data module and presets)."""
    problems: list[str] = []
    if stage is not None and not str(cfg.data._target_).endswith(stage.data_module):
        problems.append(f"the {stage.name} stage trains on a {stage.data_module} but data is {cfg.data._target_}: "
                        f"choose {stage.data_presets}")
    elif stage is not None:
        problems += unread_data_values(cfg.data)
    if cfg.data.get("context_length") is not None:
        if model_config and context_length > model_config.context_length:
            problems.append(f"data.context_length={context_length} is larger than model.context_length="
                            f"{model_config.context_length}: lower data.context_length or raise "
                            f"model.context_length")
        if context_length < 1:
            problems.append(f"data.context_length must be positive, got {context_length}")
    n_vocab = _vocabulary_size(tokenizer, problems) if tokenizer and model_config else None
    if n_vocab is not None and model_config.vocab_size < n_vocab:
        problems.append(f"model.vocab_size={model_config.vocab_size} is smaller than the {tokenizer} "
                        f"tokenizer's {n_vocab} ids: set model.vocab_size={n_vocab} (or larger)")
    train_blocks = cfg.finetune.get("train_blocks")
    if train_blocks not in ("all", "last", "head", "none") and not (
            isinstance(train_blocks, int) and model_config and 0 <= train_blocks <= model_config.n_layers):
        choices = f"0..{model_config.n_layers} or " if model_config and isinstance(train_blocks, int) else ""
        problems.append(f"finetune.train_blocks={train_blocks!r} is not one of {choices}{TRAIN_BLOCKS_CHOICES}")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    elif cfg.data.max_train_samples is not None and cfg.data.max_train_samples < cfg.data.batch_size:
        problems.append(f"data.max_train_samples={cfg.data.max_train_samples} is less than one batch of "
                        f"data.batch_size={cfg.data.batch_size}: set data.max_train_samples to "
                        f"{cfg.data.batch_size} or more (or null: the whole training split)")
    if not 0 <= cfg.data.get("max_dropped_fraction", 0) <= 1:
        problems.append(f"data.max_dropped_fraction must lie in [0, 1] (the share of a split's records that truncation "
                        f"may leave without a response), got {cfg.data.max_dropped_fraction}")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps must be a positive number of optimizer steps, got {cfg.trainer.max_steps}")
    if cfg.scheduler.warmup_steps < 0:
        problems.append(f"scheduler.warmup_steps must be >= 0, got {cfg.scheduler.warmup_steps}")
    if not 0 <= cfg.scheduler.min_lr_ratio <= 1:
        problems.append(f"scheduler.min_lr_ratio must lie in [0, 1] (the lr at the end as a share of the peak), "
                        f"got {cfg.scheduler.min_lr_ratio}")
    cooldown = cfg.scheduler.cooldown_fraction
    if cooldown is not None and not 0 < cooldown <= 1:
        problems.append(f"scheduler.cooldown_fraction must lie in (0, 1] (the share of trainer.max_steps over which "
                        f"the lr decays at the end), got {cooldown}")
    if cfg.checkpoint_every is None or cfg.checkpoint_every < 1:
        problems.append(f"checkpoint_every must be a positive number of optimizer steps, got {cfg.checkpoint_every}")
    if "overfit_batches" in cfg.trainer:
        problems.append("trainer.overfit_batches is not supported (llmtrain's loaders keep their place for exact "
                        "resume): to train on a small subset, set data.max_documents=N")
    return (problems + hardware_problems(cfg.trainer) + tracker_problems(cfg.get("logger"))
            + eval_problems(cfg.eval, cfg.trainer, stage))


def eval_problems(node: DictConfig, trainer: DictConfig, stage: type[Stage] | None) -> list[str]:
    """The values of conf/eval/ out of range, and the runs it cannot evaluate (the task names themselves are
    checked when the callback loads them, which reads their data)."""
    problems = []
    if not isinstance(node.tasks, ListConfig):
        return [f"eval.tasks must be a list of lm_eval task names, got {node.tasks!r}: e.g. eval.tasks=[hellaswag]"]
    if node.every_n_steps is not None and (not isinstance(node.every_n_steps, int) or node.every_n_steps < 1):
        problems.append(f"eval.every_n_steps must be a positive number of optimizer steps or null (at each "
                        f"validation), got {node.every_n_steps!r}")
    if node.limit is not None and not node.limit > 0:
        problems.append(f"eval.limit must be positive (N documents per task, or a share below 1) or null (all of "
                        f"them), got {node.limit!r}")
    if node.batch_size < 1:
        problems.append(f"eval.batch_size must be at least 1, got {node.batch_size}")
    if not node.tasks:
        return problems
    if not installed("lm_eval"):
        problems.append("eval.tasks needs lm-evaluation-harness: pip install 'llmtrain[eval]' (or eval=none)")
    if stage is not None and not stage.predicts_tokens:
        problems.append(f"eval.tasks: the {stage.name} stage's model predicts classes, not tokens, so lm_eval tasks "
                        "cannot score it: set eval=none")
    if is_sharded(trainer.get("strategy")):
        problems.append("eval.tasks with an FSDP strategy: evaluation during training runs each rank's share of the "
                        "documents on its own, which sharded weights cannot do: set eval=none and run python -m "
                        "llmtrain.evaluate on the run dir after training")
    return problems


def tracker_problems(logger: DictConfig | None) -> list[str]:
    """The trackers chosen (cfg.logger, or each of logger=many's) whose optional package is not installed: found
    before the run starts rather than when its Trainer is built."""
    nodes = [logger] if logger and "_target_" in logger else [n for n in (logger or {}).values() if n]
    packages = [TRACKER_PACKAGES.get(n.get("_target_")) for n in nodes]
    return [missing_tracker(p) for p in dict.fromkeys(packages) if p and not installed(p)]


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: its import is refused
        return False


def missing_tracker(package: str) -> str:
    return (f"logger={package} needs the {package} package: pip install 'llmtrain[track]' (or choose another "
            f"logger, e.g. logger=tensorboard)")


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
    if data.get("revision") is not None and source != "hub":
        problems.append(f"data.revision={data.revision!r} picks a version of a Hub dataset, but this run reads "
                        f"data.source={source}: drop data.revision (or set data.source=hub)")
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


def _vocabulary_size(tokenizer: str, problems: list[str]) -> int | None:
    """The number of ids of a tokenizer that effective_tokenizer accepted (None if it cannot be opened)."""
    try:
        return build_tokenizer(tokenizer).n_vocab
    except UserError as e:  # a tokenizer.json that is not one, or has no end-of-text token
        problems.append(str(e))
        return None


def effective(cfg: DictConfig) -> dict:
    """The run's values, resolved, as a checkpoint records them (without UNCOMPARED)."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k not in UNCOMPARED}


def flat(tree, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 1e-3}} -> {"optimizer.lr": 1e-3}; a list stays one value."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def resume_changes(saved: dict, cfg: DictConfig) -> tuple[list[str], str | None]:
    """What this run changes against the checkpoint's run (saved: the effective config it recorded): one line per
    changed key for the warning, and the refusal (None: the resume may go on)."""
    ours = flat(effective(cfg))
    before = flat(saved)
    changed = sorted(k for k in before.keys() | ours.keys() if before.get(k, "<unset>") != ours.get(k, "<unset>"))
    lines = [f"{k}: {before.get(k, '<unset>')} -> {ours.get(k, '<unset>')}" for k in changed]
    apply = [str(k) for k in cfg.resume.apply]
    other = [k for k in changed if k.startswith(OTHER_RUN)]
    unasked = [k for k in changed if k.startswith(APPLIABLE) and not k.startswith(OTHER_RUN)
               and not any(k == a or k.startswith(f"{a}.") for a in apply)]
    if other:
        return lines, (f"this run changes {', '.join(other)} against the checkpoint's run: resuming would mix two "
                       f"runs; resume with the checkpoint's values, or start a new run with init_from=<the checkpoint>")
    if unasked:
        return lines, (f"this run changes {', '.join(unasked)} against the checkpoint's run: resume with the "
                       f"checkpoint's values, or apply the new ones with resume.apply=[{','.join(unasked)}]")
    return lines, None


def check_resume(info: ModelInfo, model_config: GPTConfig, stage: Stage, ckpt_path: str,
                 init_from: str | None = None) -> None:
    """Resuming needs the checkpoint's stage and architecture, and whatever else its stage says it needs (DPO: its
    init_from, the reference model, which checkpoints do not hold): name what differs, with the value to use."""
    if info.stage is not None and info.stage != stage.name:
        raise UserError(f"ckpt_path={ckpt_path} was written by finetune={info.stage}, this run is finetune="
                        f"{stage.name}: resume with finetune={info.stage} (and its data), or use init_from= to start "
                        f"a new stage from its weights")
    problems = stage.resume_problems({"init_from": info.init_from}, init_from, ckpt_path)
    if problems:
        raise UserError("; ".join(problems))
    if info.init_from == init_from and (now := changed_weights(init_from, info.init_from_digest)):
        raise UserError(f"init_from={init_from} holds other weights than when ckpt_path={ckpt_path} was written "
                        f"(content digest {now[7:19]}, then {info.init_from_digest[7:19]}): put back the weights the "
                        f"run started from, or start a new run from these (without ckpt_path)")
    saved, ours = asdict(info.model_config), asdict(model_config)
    differ = [f"model.{k}={saved[k]} (this run: {ours[k]})" for k in ours
              if saved[k] != ours[k] and k not in FREE_KEYS]  # dropout holds no weights
    if differ:
        raise UserError(f"ckpt_path={ckpt_path} holds another architecture: {', '.join(differ)}; resume with "
                        f"the checkpoint's model settings, or use init_from= to fine-tune from its weights")
