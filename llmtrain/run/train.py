"""The recipe: config -> data -> model and stage -> LightningModule -> Trainer -> outputs.

`train(cfg)` is a plain function that tests call with a composed config; `python -m llmtrain` reaches it
through `cli.main`. Each step calls the module that owns it; this file only wires them together.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import read_info, resolve_ckpt_path
from llmtrain.interop.lora import format_trainable
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT
from llmtrain.model.vocab import grow_vocab
from llmtrain.run.board import log_hparams, run_hparams
from llmtrain.run.checks import check_resume, resume_changes
from llmtrain.run.distributed import ddp_job_of_a_sweep, is_launch_rank, wait_for
from llmtrain.run.jobs import write_metrics
from llmtrain.run.memory import preflight
from llmtrain.run.outputs import keep_tokenizer, run_meta, write_outputs
from llmtrain.run.resolve import ResolvedRun, resolve_run
from llmtrain.run.trackers import finish_runs
from llmtrain.training.callbacks import AtomicCheckpointIO, newest_checkpoint
from llmtrain.training.evaluation import TaskEvaluation
from llmtrain.training.hardware import allow_tf32, fused_optimizer, on_cuda
from llmtrain.training.logs import quiet_lightning
from llmtrain.training.module import LanguageModel
from llmtrain.training.preemption import cluster_plugins, ignore_hpc_checkpoints, stale_hpc_warning, stopping_signal

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is not a valid batch size.*|.*Trying to infer the `batch_size`.*")


def train(cfg: DictConfig, run: ResolvedRun | None = None) -> float:
    """Train as `cfg` says; return the final val/loss (what a sweeper minimises). `run`: resolve_run(cfg), when the
    caller has resolved it and run the memory pre-flight (as the command line does)."""
    if run is None:
        run = resolve_run(cfg)
        preflight(cfg, run)
    quiet_lightning()
    run_dir, stage = Path(cfg.run_dir), run.stage
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if is_launch_rank() and (stale := stale_hpc_warning(run_dir)):
        print(stale, file=sys.stderr, flush=True)
    if ckpt_path is not None:  # that it loads and fits: not deep inside fit
        info = read_info(ckpt_path, f"ckpt_path={ckpt_path}", hint="; pass another one (ckpt_path=auto "
                         "hydra.run.dir=<its run dir> takes the newest one that loads)")
        check_resume(info, run.model_config, stage, ckpt_path, cfg.init_from)
        if info.config is not None:  # checkpoints of this version record their run's config
            changes, refusal = resume_changes(info.config, cfg)
            if refusal:
                raise UserError(f"ckpt_path={ckpt_path}: {refusal}")
            if changes and is_launch_rank():
                print(f"warning: resuming {ckpt_path} with {len(changes)} changed values: {'; '.join(changes)}",
                      file=sys.stderr, flush=True)
    elif is_launch_rank() and any(run_dir.glob("checkpoints/*.ckpt")):
        raise UserError(f"{run_dir} already holds checkpoints of an earlier run: resume it with ckpt_path=last, "
                        f"or leave hydra.run.dir unset for a new run dir")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data, context_length=run.context_length, tokenizer=run.tokenizer, seed=cfg.seed)
    if is_launch_rank():  # tokenize before any DDP rank starts, so that the other ranks find the cache
        datamodule.prepare_data()
    elif hasattr(datamodule, "cache"):  # ranks started together (torchrun, SLURM): wait for rank 0's cache
        wait_for(datamodule.cache.exists, what=f"the token cache {datamodule.cache.dir}")
    datamodule.setup("fit")  # data errors surface here, before a Trainer exists
    stage.setup(datamodule)

    model = stage.build_model(start_model(cfg, run))
    lora = " in LoRA adapters" if stage.lora else ""
    rank_zero_info(f"{stage.name}: {format_trainable(model)}{lora}; precision {run.precision} ({run.precision_reason})")
    meta = run_meta(cfg, keep_tokenizer(run.tokenizer, run_dir, write=is_launch_rank()), stage)
    module = LanguageModel(
        model, stage, optimizer=build(cfg.optimizer, **fused_where_supported(cfg)),
        warmup_steps=cfg.scheduler.warmup_steps, max_steps=cfg.trainer.max_steps,
        min_lr_ratio=cfg.scheduler.min_lr_ratio, cooldown_fraction=cfg.scheduler.cooldown_fraction,
        tokenizer=run.tokenizer, checkpoint_info=meta,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        new_optimizer_settings=any(str(k).startswith("optimizer.") for k in cfg.resume.apply),
    )
    module.gpt.gradient_checkpointing = cfg.perf.activation_checkpointing
    if on_cuda(cfg.trainer.accelerator):
        allow_tf32(cfg.perf.tf32)
    if cfg.perf.compile:  # in place: the state dict keeps its keys (no _orig_mod. prefix in checkpoints)
        module.gpt.compile()
        module.gpt.hidden = torch.compile(module.gpt.hidden)  # what the chunked loss calls
    trainer = build_trainer(cfg, run)
    if trainer.loggers and trainer.is_global_zero:  # the run's values, e.g. for TensorBoard's HPARAMS tab
        log_hparams(trainer.loggers, run_hparams(cfg, run, model), stage)
    if cfg.init_from and ckpt_path is None:  # the starting point, at step 0 of the curves
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        if trainer.is_global_zero:
            shown = dict.fromkeys(("loss", stage.progress_metric))  # the loss, and the metric the progress bar shows
            shown = ", ".join(f"val/{m} {start[f'val/{m}']:.4f}" for m in shown)
            print(f"before fine-tuning: {shown}")
    try:
        with ddp_job_of_a_sweep(trainer.world_size, trainer.num_nodes):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"stopped by {stopping_signal(trainer)} at step {trainer.global_step}; newest checkpoint: "
                  f"{newest_checkpoint(trainer) or 'none'}. "
                  f"Resume with: python -m llmtrain <same overrides> hydra.run.dir={run_dir} ckpt_path=auto")
        sys.exit(0)

    if module.validated_at_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the returned loss is of the final weights
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "eval/"))}
    if stage.test_after_fit():
        final |= trainer.test(module, datamodule=datamodule, verbose=False)[0]
    summary = f"done: {trainer.global_step} steps, {stage.summary(final, datamodule)}"
    scores = [cb.summary(final) for cb in trainer.callbacks if isinstance(cb, TaskEvaluation)]
    summary += "".join(f", {score}" for score in scores if score)  # benchmark accuracies beside the loss
    written = write_outputs(module, trainer, datamodule, cfg, meta)  # every rank: FSDP gathers the weights
    if trainer.is_global_zero:
        write_metrics(run_dir, {"step": trainer.global_step, **final})  # what a sweep's summary table reads
        finish_runs(trainer.loggers)
        print("; ".join([summary, *written, f"run dir {run_dir}"]))
    return final["val/loss"]


# Precisions that train the weights themselves in a lower precision (no float32 copy): pretrained weights are
# loaded straight into it (bf16 files stay bf16, without a float32 model in between)
TRUE_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def start_model(cfg: DictConfig, run: ResolvedRun) -> GPT:
    """The GPT a stage starts from: random weights of the resolved config, or init_from's with the values the run
    may change (a shorter context, another dropout) applied."""
    if run.start is None:
        return GPT(run.model_config)
    model, _ = load_pretrained(str(cfg.init_from), dtype=TRUE_PRECISIONS.get(str(run.precision), torch.float32))
    if run.model_config.context_length < model.config.context_length:
        model.crop_context(run.model_config.context_length)
    if run.model_config.drop_rate != model.config.drop_rate:
        model.set_drop_rate(run.model_config.drop_rate)
    if run.model_config.vocab_size > model.config.vocab_size:  # special tokens added to the tokenizer
        grow_vocab(model, run.model_config.vocab_size)
    return model


def build_trainer(cfg: DictConfig, run: ResolvedRun) -> L.Trainer:
    """lightning.Trainer from cfg.trainer, with the resolved precision and accumulation, the callbacks and logger
    as the config builds them, checkpoints written atomically, and under SLURM without Lightning's auto-requeue
    (llmtrain's LastCheckpoint saves and requeues instead)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs |= {"precision": run.precision, "accumulate_grad_batches": run.accumulate}
    for key, node in cfg.trainer.items():  # objects: a strategy (FSDP with its wrap policy), a profiler
        if isinstance(node, DictConfig) and "_target_" in node:
            kwargs[key] = build(node)
    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None]
    if cfg.eval.tasks:  # benchmark tasks during training (conf/eval/)
        callbacks.append(build(cfg.eval, tokenizer=run.tokenizer))
    # a progress bar or model summary set to null in cfg.callbacks means none, not Lightning's default one
    kwargs.setdefault("enable_progress_bar", any(isinstance(cb, ProgressBar) for cb in callbacks))
    kwargs.setdefault("enable_model_summary", False)  # ours (callbacks.model_summary) prints without it
    trainer = L.Trainer(**kwargs, logger=build_loggers(cfg.logger), callbacks=callbacks,
                        plugins=[AtomicCheckpointIO(), *cluster_plugins()])
    return ignore_hpc_checkpoints(trainer)


def build_loggers(node: DictConfig | None) -> list:
    """The trackers of cfg.logger: one logger (a node with a _target_), or logger=many's (a node per tracker, one
    set to null is left out); none when null."""
    if not node:
        return []
    return [build(node)] if "_target_" in node else [build(n) for n in node.values() if n]


def fused_where_supported(cfg: DictConfig) -> dict:
    """AdamW's fused kernel (one kernel for the whole update) on CUDA and CPU when optimizer.fused is null; not
    under 16-mixed with clipping: the fused step unscales fp16 gradients itself, after clipping would have seen
    them scaled (Lightning refuses the pair)."""
    wants = "fused" in cfg.optimizer and cfg.optimizer.fused is None and fused_optimizer(cfg.trainer.accelerator)
    scaled = str(cfg.trainer.precision).startswith("16") and "mixed" in str(cfg.trainer.precision)
    return {"fused": True} if wants and not (scaled and cfg.trainer.gradient_clip_val) else {}


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, letting a UserError raised by the target through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
