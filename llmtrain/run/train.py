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
from llmtrain.run.board import log_hparams, run_hparams
from llmtrain.run.checks import Effective, check_config, check_resume
from llmtrain.run.distributed import ddp_job_of_a_sweep, is_launch_rank, wait_for
from llmtrain.run.jobs import write_metrics
from llmtrain.run.memory import preflight
from llmtrain.run.outputs import keep_tokenizer, run_meta, write_outputs
from llmtrain.stages.common import build_model, build_preference, sample_prompts
from llmtrain.training.callbacks import AtomicCheckpointIO, Throughput, newest_checkpoint
from llmtrain.training.flops import peak_flops, training_flops
from llmtrain.training.hardware import allow_tf32, fused_optimizer, on_cuda
from llmtrain.training.logs import ModelSummary, quiet_lightning
from llmtrain.training.module import LanguageModel

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is not a valid batch size.*|.*Trying to infer the `batch_size`.*")


def train(cfg: DictConfig, eff: Effective | None = None) -> float:
    """Train as `cfg` says; return the final val/loss (what a sweeper minimises). `eff`: check_config(cfg), when the
    caller has run it and the memory pre-flight (as the command line does)."""
    if eff is None:
        eff = check_config(cfg)
        preflight(cfg, eff)
    quiet_lightning()
    run_dir, task = Path(cfg.run_dir), cfg.finetune.task
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if ckpt_path is not None:  # that it loads and fits: not deep inside fit
        info = read_info(ckpt_path, f"ckpt_path={ckpt_path}", hint="; pass another one (ckpt_path=auto "
                         "hydra.run.dir=<its run dir> takes the newest one that loads)")
        check_resume(info, eff.model_config, cfg.finetune.name, ckpt_path, cfg.init_from)
    elif is_launch_rank() and any(run_dir.glob("checkpoints/*.ckpt")):
        raise UserError(f"{run_dir} already holds checkpoints of an earlier run: resume it with ckpt_path=last, "
                        f"or leave hydra.run.dir unset for a new run dir")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data, context_length=eff.context_length, tokenizer=eff.tokenizer, seed=cfg.seed)
    if is_launch_rank():  # tokenize before any DDP rank starts, so that the other ranks find the cache
        datamodule.prepare_data()
    elif hasattr(datamodule, "cache"):  # ranks started together (torchrun, SLURM): wait for rank 0's cache
        wait_for(datamodule.cache.exists, what=f"the token cache {datamodule.cache.dir}")
    datamodule.setup("fit")  # data errors surface here, before a Trainer exists
    label_names = datamodule.label_names if task == "classify" else None

    model = build_model(cfg.finetune, eff, cfg.init_from, len(label_names) if label_names else None)
    rank_zero_info(f"{cfg.finetune.name}: {format_trainable(model)}; precision {eff.precision} "
                   f"({eff.precision_reason})")
    meta = run_meta(cfg, keep_tokenizer(eff.tokenizer, run_dir, write=is_launch_rank()), label_names)
    module = LanguageModel(
        model, optimizer=build(cfg.optimizer, **fused_where_supported(cfg)), warmup_steps=cfg.scheduler.warmup_steps,
        max_steps=cfg.trainer.max_steps, min_lr_ratio=cfg.scheduler.min_lr_ratio, tokenizer=eff.tokenizer,
        task=task if task in ("classify", "dpo") else "lm", label_names=label_names,
        preference=build_preference(cfg.finetune, model),
        sample_prompts=sample_prompts(cfg.finetune, datamodule.records["val"] if task in ("instruct", "dpo") else None),
        sample_tokens=cfg.finetune.sample_tokens if task != "classify" else 0,
        max_nonfinite_steps=cfg.max_nonfinite_steps, checkpoint_info=meta, loss_chunk=cfg.perf.loss_chunk,
        tokens_vary=task in ("instruct", "dpo"),
    )
    module.gpt.gradient_checkpointing = cfg.perf.activation_checkpointing
    if on_cuda(cfg.trainer.accelerator):
        allow_tf32(cfg.perf.tf32)
    if cfg.perf.compile:  # in place: the state dict keeps its keys (no _orig_mod. prefix in checkpoints)
        module.gpt.compile()
        module.gpt.hidden = torch.compile(module.gpt.hidden)  # what the chunked loss calls
    trainer = build_trainer(cfg, eff, module)
    if trainer.logger and trainer.is_global_zero:  # the run's values, for TensorBoard's HPARAMS tab
        log_hparams(trainer.logger, run_hparams(cfg, eff, model), task)
    if cfg.init_from and ckpt_path is None:  # the starting point, at step 0 of the curves
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        if trainer.is_global_zero:
            extra = f", val/rewards/accuracy {start['val/rewards/accuracy']:.4f}" if task == "dpo" else ""
            print(f"before fine-tuning: val/loss {start['val/loss']:.4f}{extra}")
    try:
        with ddp_job_of_a_sweep(trainer.world_size, trainer.num_nodes):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM at step {trainer.global_step}; newest checkpoint: "
                  f"{newest_checkpoint(trainer) or 'none'}. "
                  f"Resume with: python -m llmtrain <same overrides> hydra.run.dir={run_dir} ckpt_path=auto")
        sys.exit(0)

    if module.validated_at_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the returned loss is of the final weights
    metrics = trainer.callback_metrics
    final = {"step": trainer.global_step, **{k: float(v) for k, v in metrics.items() if k.startswith("val/")}}
    summary = f"done: {trainer.global_step} steps, val/loss {float(metrics['val/loss']):.4f}"
    if task == "classify":
        test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        final |= test
        summary += (f", val/acc {float(metrics['val/acc']):.4f}, test/acc {test['test/acc']:.4f} "
                    f"(majority class {datamodule.majority_baseline('test'):.4f}), test/f1 {test['test/f1']:.4f}")
    elif task == "dpo":
        summary += (f", val/rewards/accuracy {float(metrics['val/rewards/accuracy']):.4f}, val/rewards/margin "
                    f"{float(metrics['val/rewards/margin']):.4f}")
    else:
        summary += f", val/ppl {float(metrics['val/ppl']):.2f}"
    written = write_outputs(module, trainer, datamodule, cfg, meta)  # every rank: FSDP gathers the weights
    if trainer.is_global_zero:
        write_metrics(run_dir, final)  # what a sweep's summary table reads
        print("; ".join([summary, *written, f"run dir {run_dir}"]))
    return float(metrics["val/loss"])


def build_trainer(cfg: DictConfig, eff: Effective, module: LanguageModel) -> L.Trainer:
    """lightning.Trainer from cfg.trainer, with the effective precision and accumulation, our callbacks and
    logger, and checkpoints written atomically."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs |= {"precision": eff.precision, "accumulate_grad_batches": eff.accumulate}
    for key, node in cfg.trainer.items():  # objects: a strategy (FSDP with its wrap policy), a profiler
        if isinstance(node, DictConfig) and "_target_" in node:
            kwargs[key] = build(node)
    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None]
    for cb in callbacks:
        if isinstance(cb, Throughput):
            cb.flops = training_flops(module.model, module.gpt.config.n_layers, module.gpt.config.emb_dim)
            cb.peak_flops = cfg.perf.peak_flops or device_peak(cfg, eff)
        if isinstance(cb, ModelSummary):
            cb.context_length = eff.context_length
    # a progress bar or model summary set to null in cfg.callbacks means none, not Lightning's default one
    kwargs.setdefault("enable_progress_bar", any(isinstance(cb, ProgressBar) for cb in callbacks))
    kwargs.setdefault("enable_model_summary", False)  # ours (callbacks.model_summary) prints without it
    logger = build(cfg.logger) if cfg.logger else False
    return L.Trainer(**kwargs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()])


def device_peak(cfg: DictConfig, eff: Effective) -> float | None:
    """The peak FLOP/s of this run's device from the table in flops.py; for a device not in it, a line saying how to
    get train/mfu anyway."""
    cuda = on_cuda(cfg.trainer.accelerator)
    name = torch.cuda.get_device_name() if cuda else "this CPU"
    peak = peak_flops(name, eff.precision, tf32=cfg.perf.tf32 and cuda)
    if peak is None:
        rank_zero_info(f"train/mfu is not logged: the peak FLOP/s of {name} at trainer.precision={eff.precision} is "
                       f"not in llmtrain's table; set perf.peak_flops=<its dense peak per device> to log it")
    return peak


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
