"""The only place that wires things: config -> data module -> LightningModule(model, optimizer, schedule) -> Trainer.

`train(cfg)` is a plain function (tests call it with a composed config); `main` is the Hydra entry point
behind `python -m llmtrain` and the `llmtrain` command. Heavy imports (torch, lightning) happen inside
`train`, so that `--help` and config errors answer at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmtrain.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
NOT_OPTIMIZER_KEYS = ("schedule", "tokens_per_step")  # read by train.py, not passed to the optimizer


def validate(cfg: DictConfig) -> None:
    """Check cross-group rules before anything is built; report every problem at once."""
    from llmtrain.model import GPTConfig
    from llmtrain.tokenizer import TOKENIZERS, build_tokenizer

    problems: list[str] = []
    try:
        GPTConfig(**cfg.model)
    except ValueError as e:
        problems += str(e).split("; ")
    except TypeError as e:  # an unknown key under model
        problems.append(f"model: {e}")
    if cfg.data.tokenizer not in TOKENIZERS:
        problems.append(f"data.tokenizer={cfg.data.tokenizer!r} is not known: choose one of {', '.join(TOKENIZERS)}")
    else:
        n_vocab = build_tokenizer(cfg.data.tokenizer).n_vocab
        if cfg.model.vocab_size < n_vocab:
            problems.append(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the {cfg.data.tokenizer} tokenizer's "
                f"{n_vocab} ids: set model.vocab_size={n_vocab} (or larger)"
            )
    ctx = cfg.data.get("context_length")
    if ctx is not None and ctx > cfg.model.context_length:
        problems.append(
            f"data.context_length={ctx} is larger than model.context_length={cfg.model.context_length}: "
            f"lower data.context_length or raise model.context_length"
        )
    if ctx is not None and ctx < 1:
        problems.append(f"data.context_length must be positive, got {ctx}")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps must be a positive number of optimizer steps, got {cfg.trainer.max_steps}")
    sched = cfg.optimizer.schedule
    if sched.warmup_steps < 0:
        problems.append(f"optimizer.schedule.warmup_steps must be >= 0, got {sched.warmup_steps}")
    if sched.min_lr > cfg.optimizer.lr:
        problems.append(f"optimizer.schedule.min_lr={sched.min_lr} exceeds optimizer.lr={cfg.optimizer.lr}: lower it")
    try:
        accumulation_steps(cfg, cfg.data.get("context_length") or cfg.model.context_length)
    except UserError as e:
        problems.append(str(e))
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") or isinstance(cfg.trainer.devices, int) and accelerator == "auto":
        import torch

        n_gpus = torch.cuda.device_count()
        if accelerator in ("gpu", "cuda") and n_gpus == 0:
            problems.append(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: "
                            f"use trainer.accelerator=cpu (or auto)")
        elif n_gpus and isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > n_gpus:
            problems.append(f"trainer.devices={cfg.trainer.devices} but this machine has {n_gpus} GPUs: "
                            f"set trainer.devices={n_gpus} or fewer")
    problems += _precision_problems(cfg.trainer)
    if cfg.checkpoint_every is None or cfg.checkpoint_every < 1:
        problems.append(f"checkpoint_every must be a positive number of optimizer steps, got {cfg.checkpoint_every}")
    if cfg.trainer.get("overfit_batches"):
        problems.append("trainer.overfit_batches is not supported (llmtrain's loaders keep their place for exact "
                        "resume): to train on a small subset, set data.max_documents=N")
    task = cfg.finetune.get("task", "lm")
    wanted = {"lm": "TextDataModule", "instruct": "InstructDataModule", "classify": "ClassifyDataModule"}
    examples = {"lm": "data=embedded or data=text", "instruct": "data=instruct_embedded or data=alpaca",
                "classify": "data=classify_embedded or data=sms_spam"}
    if task not in wanted:
        problems.append(f"finetune.task={task!r} is not known: choose one of {', '.join(wanted)}")
    elif not str(cfg.data.get("_target_", "")).endswith(wanted[task]):
        problems.append(f"finetune.task={task} needs a {wanted[task]} but data is {cfg.data.get('_target_')}: "
                        f"choose {examples[task]}")
    if problems:
        raise UserError("; ".join(problems))


def _precision_problems(trainer_cfg: DictConfig) -> list[str]:
    """Precisions this machine cannot train in: fp16 off CUDA (NaN or a silent switch), bf16 on old GPUs."""
    precision = str(trainer_cfg.precision)
    if precision.startswith("16") and not _on_cuda(trainer_cfg):
        return [f"trainer.precision={precision} needs a CUDA GPU (fp16 on CPU gives NaN losses or silently "
                f"becomes bf16): use trainer.precision=bf16-mixed or 32-true"]
    if precision.startswith("bf16") and _on_cuda(trainer_cfg):
        import torch

        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return [f"trainer.precision={precision} but {torch.cuda.get_device_name()} has no bf16 support "
                    f"(it needs an Ampere or newer GPU): use trainer.precision=16-mixed or 32-true"]
    return []


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """A .ckpt file as given; a run or checkpoints folder -> its last.ckpt; "last" -> run_dir's last.ckpt;
    "auto" -> run_dir's last.ckpt if there is one, else a fresh start (for jobs that a scheduler restarts)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        return newest_loadable_checkpoint(Path(run_dir) / "checkpoints")
    path = Path(run_dir) if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        hint = " (pass the earlier run's hydra.run.dir=... so that 'last' finds it)" if ckpt_path == "last" else ""
        raise UserError(f"ckpt_path={ckpt_path!r}: no last.ckpt in {path}{hint}")
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path!r} does not exist: give a .ckpt file or a run dir")
    return str(path)


def check_resume_fits(ckpt_path: str, model_config, stage: str) -> None:
    """Resuming needs the checkpoint's stage and architecture: name what differs, with the value to use."""
    from dataclasses import asdict

    from llmtrain.finetune import checkpoint_meta

    meta = checkpoint_meta(ckpt_path, f"ckpt_path={ckpt_path}")
    if meta.get("stage", stage) != stage:
        raise UserError(f"ckpt_path={ckpt_path} was written by finetune={meta['stage']}, this run is finetune={stage}: "
                        f"resume with finetune={meta['stage']} (and its data), or use init_from= to start a new "
                        f"stage from its weights")
    saved = meta.get("model_config")
    if not saved:
        return
    ours = asdict(model_config)
    differ = [f"model.{k}={saved[k]} (this run: {ours[k]})" for k in ours
              if k in saved and saved[k] != ours[k] and k != "drop_rate"]  # dropout holds no weights
    if differ:
        raise UserError(f"ckpt_path={ckpt_path} holds another architecture: {', '.join(differ)}; resume with "
                        f"the checkpoint's model settings, or use init_from= to fine-tune from its weights")


def newest_loadable_checkpoint(folder: Path) -> str | None:
    """last.ckpt if it opens as a checkpoint, else the newest other .ckpt that does (a file cut short: passed over)."""
    import torch

    # last.ckpt first: it is always saved right after an optimizer step (a best-by-val/loss file may fall
    # inside a gradient-accumulation window); then the others, newest first
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated or corrupt: say so and take the next one
            print(f"warning: skipping {path}: it does not load ({type(e).__name__})", file=sys.stderr)
            continue
        return str(path)
    return None


def _is_launch_rank() -> bool:
    """True in the process a user started (not in a rank that a DDP launcher re-started)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _wait_for(ready, what: str, timeout_s: float = 3 * 3600) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise UserError(f"gave up after {timeout_s:.0f} s waiting for {what} from local rank 0")
        time.sleep(0.5)


def _on_cuda(trainer_cfg: DictConfig) -> bool:
    import torch

    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _precision(trainer_cfg: DictConfig) -> str | int:
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    import torch

    bf16 = _on_cuda(trainer_cfg) and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if bf16 else "32-true"


def accumulation_steps(cfg: DictConfig, context_length: int) -> int:
    """trainer.accumulate_grad_batches, or derived from optimizer.tokens_per_step when that is set."""
    target = cfg.optimizer.get("tokens_per_step")
    if not target:
        return cfg.trainer.accumulate_grad_batches
    devices = cfg.trainer.devices
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"optimizer.tokens_per_step needs a number of devices, but trainer.devices={devices!r}: "
                        f"set trainer.devices=N")
    per_micro_step = devices * cfg.trainer.num_nodes * cfg.data.batch_size * context_length
    if target % per_micro_step:
        raise UserError(
            f"optimizer.tokens_per_step={target} is not a multiple of devices x nodes x data.batch_size x "
            f"context ({devices} x {cfg.trainer.num_nodes} x {cfg.data.batch_size} x {context_length} = "
            f"{per_micro_step}): choose a multiple of {per_micro_step} or change data.batch_size"
        )
    return target // per_micro_step


def apply_perf(model, cfg: DictConfig, on_cuda: bool) -> None:
    """The speed switches of cfg.perf (see conf/config.yaml)."""
    import torch

    from llmtrain.model import GPT

    gpt = next(m for m in model.modules() if isinstance(m, GPT))
    gpt.gradient_checkpointing = bool(cfg.perf.activation_checkpointing)
    if on_cuda and cfg.perf.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.perf.compile:
        gpt.compile()  # in place: the state dict keeps its keys (no _orig_mod. prefix in checkpoints)


def train(cfg: DictConfig) -> float:
    """Train as `cfg` says; return the final val/loss (what a sweeper minimises)."""
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, str(run_dir))
    if cfg.ckpt_path is None and _is_launch_rank() and any(run_dir.glob("checkpoints/*.ckpt")):
        raise UserError(
            f"{run_dir} already holds checkpoints of an earlier run: resume it with ckpt_path=last, "
            f"or leave hydra.run.dir unset for a new run dir"
        )

    import warnings

    import lightning as L

    from llmtrain.module import LanguageModel

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is not a valid batch size.*|.*Trying to infer the `batch_size`.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    task = cfg.finetune.get("task", "lm")
    model, info = build_model(cfg)
    if ckpt_path is not None:
        check_resume_fits(ckpt_path, model.config, cfg.finetune.name)  # and that it loads: not deep inside fit
    tokenizer = info.get("tokenizer") or cfg.data.tokenizer
    context_length = min(cfg.data.get("context_length") or model.config.context_length, model.config.context_length)
    datamodule = instantiate(cfg.data, context_length=context_length, tokenizer=tokenizer, seed=cfg.seed)
    if _is_launch_rank():  # tokenize before any DDP rank starts, so that the other ranks find the cache
        datamodule.prepare_data()
    elif hasattr(datamodule, "cache"):  # ranks started together (torchrun, SLURM): wait for rank 0's cache
        _wait_for(datamodule.cache.exists, what=f"the token cache {datamodule.cache.dir}")
    datamodule.setup("fit")  # data errors surface here, before a Trainer exists

    label_names = None
    if task == "classify":
        from llmtrain.finetune import replace_head

        label_names = datamodule.label_names
        replace_head(model, len(label_names))
    model = prepare_stage(model, cfg)

    optimizer_cfg = OmegaConf.masked_copy(cfg.optimizer, [k for k in cfg.optimizer if k not in NOT_OPTIMIZER_KEYS])
    on_cuda = _on_cuda(cfg.trainer)
    if on_cuda and optimizer_cfg.get("fused", "absent") is None:
        optimizer_cfg.fused = True  # one kernel for the whole update
    apply_perf(model, cfg, on_cuda)
    module = LanguageModel(
        model,
        optimizer=instantiate(optimizer_cfg),
        warmup_steps=cfg.optimizer.schedule.warmup_steps,
        max_steps=cfg.trainer.max_steps,
        min_lr=cfg.optimizer.schedule.min_lr,
        tokenizer=tokenizer,
        task="classify" if task == "classify" else "lm",
        label_names=label_names,
        sample_prompts=_sample_prompts(cfg, datamodule),
        sample_tokens=cfg.finetune.get("sample_tokens", 48),
        max_nonfinite_steps=cfg.get("max_nonfinite_steps", 0),
        checkpoint_info={"init_from": cfg.init_from, "stage": cfg.finetune.name,
                         **_prompt_template(task)},
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = _precision(cfg.trainer)
    if isinstance(cfg.trainer.strategy, DictConfig):  # a strategy object, e.g. FSDP with its wrap policy
        trainer_kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    trainer_kwargs["accumulate_grad_batches"] = accumulation_steps(cfg, context_length)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] if cfg.callbacks else []
    from llmtrain.callbacks import AtomicCheckpointIO, Throughput, device_peak_flops

    for cb in callbacks:
        if isinstance(cb, Throughput):
            cb.flops_per_token = module.gpt.flops_per_token(context_length)
            cb.peak_flops = cfg.perf.peak_flops or device_peak_flops(trainer_kwargs["precision"])
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = L.Trainer(**trainer_kwargs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    if logger:  # what this stage trains, next to the curves
        from llmtrain.lora import trainable_summary  # counts only; peft is not imported

        trainable, _, fraction = trainable_summary(model)
        logger.log_metrics({"model/trainable_params": trainable, "model/trainable_fraction": fraction}, 0)
    if cfg.init_from and ckpt_path is None:  # the starting point, at step 0 of the curves
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        if trainer.is_global_zero:
            print(f"before fine-tuning: val/loss {start['val/loss']:.4f}")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        with _ddp_job_of_a_sweep(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        if trainer.is_global_zero:
            from llmtrain.callbacks import newest_checkpoint

            print(f"stopped by SIGTERM at step {trainer.global_step}; newest checkpoint: "
                  f"{newest_checkpoint(trainer) or 'none'}. "
                  f"Resume with: python -m llmtrain <same overrides> hydra.run.dir={run_dir} ckpt_path=auto")
        sys.exit(0)

    val_loss = trainer.callback_metrics.get("val/loss")
    if val_loss is None or trainer.global_step % _val_every(cfg, len(datamodule.train_dataloader())):
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the returned loss is of the final weights
        val_loss = trainer.callback_metrics["val/loss"]
    summary = f"done: {trainer.global_step} steps, val/loss {float(val_loss):.4f}"
    if task == "classify":
        val_acc = float(trainer.callback_metrics["val/acc"])
        test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        summary += (f", val/acc {val_acc:.4f}, test/acc {test['test/acc']:.4f} "
                    f"(majority class {datamodule.majority_baseline('test'):.4f}), test/f1 {test['test/f1']:.4f}")
    else:
        summary += f", val/ppl {float(trainer.callback_metrics['val/ppl']):.2f}"
    if trainer.is_global_zero:
        print("; ".join([summary, *write_outputs(module, trainer, datamodule, cfg, tokenizer, label_names),
                         f"run dir {run_dir}"]))
    return float(val_loss)


def write_outputs(module, trainer, datamodule, cfg: DictConfig, tokenizer: str, label_names) -> list[str]:
    """What a finished run leaves beside its checkpoints (rank zero): the safetensors export of the final
    weights, a LoRA stage's adapter, an instruct stage's answers to the test split; a phrase for each."""
    from lightning.pytorch.strategies import FSDPStrategy

    run_dir, task = Path(cfg.run_dir), cfg.finetune.get("task", "lm")
    meta = {"tokenizer": tokenizer, "task": task, "label_names": label_names, **_prompt_template(task)}
    written = []
    if isinstance(trainer.strategy, FSDPStrategy):  # the weights are sharded across ranks here
        written.append(f"no export under FSDP (the final state is in {run_dir / 'checkpoints' / 'last.ckpt'})")
    else:  # LoRA merged: what generate.py and init_from read, without pickle
        from llmtrain.export import export_model

        export_model(module.model, run_dir / "model",
                     {**meta, "stage": cfg.finetune.name, "step": trainer.global_step, "init_from": cfg.init_from})
        written.append(f"model exported to {run_dir / 'model'}")
    if cfg.finetune.get("lora"):
        from llmtrain.lora import save_adapter

        save_adapter(module.model, run_dir / "adapter")
        (run_dir / "adapter" / "llmtrain_adapter.json").write_text(json.dumps({"base": cfg.init_from, **meta},
                                                                              indent=1))
        written.append(f"adapter in {run_dir / 'adapter'}")
    if task == "instruct":
        n = write_test_generations(module, datamodule, run_dir / "test_generations.jsonl", cfg.finetune)
        written.append(f"{n} test answers in {run_dir / 'test_generations.jsonl'}")
    return written


def _prompt_template(task: str) -> dict:
    """What checkpoints, adapters and exports of a stage record about its prompts (read by generate.py)."""
    return {"prompt_template": "alpaca"} if task == "instruct" else {}


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def _ddp_job_of_a_sweep(trainer):
    """Let each job of a `-m` sweep run as its own DDP group in its own sweep subdir.

    Lightning re-launches the other ranks with the original command line (so each child would start a
    sweep of its own) and Hydra's run dir: give it this job's concrete overrides and output dir instead.
    Afterwards, end the job's process group and restore the environment Lightning set up for it
    (LOCAL_RANK, MASTER_PORT, ...), so that the next job launches its own ranks."""
    if trainer.world_size <= 1 or trainer.num_nodes > 1 or not _in_multirun() or not _is_launch_rank():
        yield
        return
    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    saved_argv, saved_env, saved_run_dir = sys.argv, dict(os.environ), hc.run.dir
    sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]  # a sweeper preset must not sweep again
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        with read_write(hc.run):
            hc.run.dir = saved_run_dir


def build_model(cfg: DictConfig):
    """A fresh GPT from cfg.model, or the weights of cfg.init_from (whose config then wins)."""
    from llmtrain.model import GPT, GPTConfig

    if not cfg.init_from:
        return GPT(GPTConfig(**cfg.model)), {}
    from llmtrain.finetune import check_fits, crop_context, load_pretrained

    model, info = load_pretrained(str(cfg.init_from))
    if _model_overridden():
        check_fits(model.config, OmegaConf.to_container(cfg.model))
        if cfg.model.context_length < model.config.context_length:
            crop_context(model, cfg.model.context_length)
    model.train()
    return model, info


def _model_overridden() -> bool:
    """Whether the user chose a model on the command line (then it must fit the checkpoint)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.split("=")[0].lstrip("+~").startswith("model") for o in HydraConfig.get().overrides.task)


def prepare_stage(model, cfg: DictConfig):
    """Freeze what the stage keeps fixed; wrap with LoRA adapters when the stage asks for them."""
    from llmtrain.finetune import set_trainable

    set_trainable(model, cfg.finetune.get("train_blocks", "all"))
    lora = cfg.finetune.get("lora")
    if not lora:
        return model
    from lightning.pytorch.utilities import rank_zero_info

    from llmtrain.lora import apply_lora, format_trainable

    keep = ["head"] if cfg.finetune.task == "classify" else None
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                       target_modules=list(lora.target_modules), modules_to_save=keep)
    rank_zero_info(f"LoRA: {format_trainable(model)}")
    return model


def _sample_prompts(cfg: DictConfig, datamodule) -> list[str]:
    if cfg.finetune.get("task") == "instruct":
        from llmtrain.data import format_prompt

        records = datamodule.records["val"][: cfg.finetune.get("num_samples", 3)]
        return [format_prompt(r["instruction"], r.get("input") or "") for r in records]
    prompt = cfg.finetune.get("sample_prompt")
    return [prompt] if prompt else []


def write_test_generations(module, datamodule, path: Path, finetune_cfg: DictConfig) -> int:
    """Answer the test split's instructions greedily; write instruction, input, reference and answer as JSONL."""
    import torch

    from llmtrain.data import format_prompt

    tok = datamodule.tokenizer
    gpt = module.gpt
    records = datamodule.records["test"]
    limit = finetune_cfg.get("test_generations")
    records = records[:limit] if limit is not None else records
    was_training = module.model.training
    module.model.eval()
    with open(path, "w") as f:
        for r in records:
            prompt = tok.encode_ordinary(format_prompt(r["instruction"], r.get("input") or ""))
            prompt = prompt[-(gpt.config.context_length - 1):]
            n_new = min(finetune_cfg.get("max_new_tokens", 100), gpt.config.context_length - len(prompt))
            idx = torch.tensor([prompt], device=module.device)
            out = gpt.generate(idx, n_new, temperature=0, eos_id=tok.eot_token)  # LoRA layers sit inside gpt
            answer = tok.decode([t for t in out[0, len(prompt):].tolist() if t < tok.eot_token])
            f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input") or "",
                                "reference": r["output"], "generated": answer.strip()}) + "\n")
    module.model.train(was_training)
    return len(records)


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, letting a UserError raised by the target through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _val_every(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Optimizer steps between validations, for the configured interval (in training batches)."""
    interval = cfg.trainer.val_check_interval or batches_per_epoch
    if isinstance(interval, float) and interval <= 1.0:
        interval = int(interval * batches_per_epoch)
    return max(1, int(interval) // (cfg.trainer.accumulate_grad_batches or 1))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except UserError as e:
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        _remove_if_unused(Path(cfg.run_dir))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _remove_if_unused(run_dir: Path) -> None:
    """A run that stopped on bad input leaves no run dir behind (unless something else is already in it)."""
    if not _is_launch_rank() or not run_dir.is_dir():
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.resolve().parents:  # and the folders made for it, while they are empty
            if parent == Path.cwd() or any(parent.iterdir()):
                break
            parent.rmdir()

