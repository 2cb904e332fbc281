"""What a run shows in TensorBoard: the curves a user watches first, one learning-rate curve, and the run's
hyperparameters with its final metrics, so that the HPARAMS tab compares the jobs of a sweep.

TensorBoard sorts the groups of cards by name (`epoch` < `lr-AdamW` < `model` < `train` < `val`), so what a
run logs is kept to train/ and val/ (test/ at the end of a classifier's run): no `epoch` card (always 0 here:
runs are measured in steps), the learning rate as `train/lr`, and what describes the run rather than its
progress (trainable parameters, the values it was given) as hyperparameters, not as one-point curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import Container, DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from torch import nn

from llmtrain.interop.lora import trainable_summary
from llmtrain.run.jobs import override_key, sweep_trial_name, varied_keys
from llmtrain.run.resolve import ResolvedRun
from llmtrain.stages.base import Stage

DATA_TYPES = {int: api_pb2.DATA_TYPE_FLOAT64, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}
# the groups whose choice names a run (experiment=..., model=...), in the order the table shows them
GROUPS = ("experiment", "debug", "model", "data", "finetune", "optimizer", "scheduler", "trainer")


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` value that Lightning adds to every logged dict, and with
    the run's hyperparameters for the HPARAMS tab (`log_run`), whose session ends with the run's status."""

    _run_logged = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_run(self, params: dict[str, float | str], metrics: tuple[str, ...], varied: set[str],
                trial: str = "") -> None:
        """Record `params` with the names of the metrics to compare; `varied`: the params that tell this run from
        the others (the swept keys), which TensorBoard lists first; `trial`: the name the table shows (by
        default the run's folder).

        TensorBoard shows, for each run, the last value of each metric's curve, which the run writes anyway: the
        summaries are written at the start (a running sweep is listed at once) and no placeholder value is
        logged, unlike `log_hyperparams(params, metrics)`, which adds a point to each curve."""
        infos = [api_pb2.HParamInfo(name=k, type=DATA_TYPES[type(v)], differs=k in varied) for k, v in params.items()]
        metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics]
        start = SessionStartInfo(group_name=trial, start_time_secs=time.time())
        for name, value in params.items():
            field = "string_value" if isinstance(value, str) else "number_value"
            setattr(start.hparams[name], field, value)
        writer = self.experiment._get_file_writer()
        writer.add_summary(hparams_summary(api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)))
        writer.add_summary(hparams_summary(start))
        writer.flush()
        self._run_logged = True

    @rank_zero_only
    def log_samples(self, samples: dict[str, str], step: int) -> None:
        """Text samples (name -> text, Markdown) for the TEXT tab."""
        for name, text in samples.items():
            self.experiment.add_text(name, text, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run_logged:
            end = SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status == "success" else api_pb2.STATUS_FAILURE,
                                 end_time_secs=time.time())
            self.experiment._get_file_writer().add_summary(hparams_summary(end))
        super().finalize(status)


def hparams_summary(record: api_pb2.Experiment | SessionStartInfo | SessionEndInfo) -> Summary:
    """The summary that TensorBoard's hparams plugin reads a record from (as its own summary module writes it,
    which needs TensorFlow)."""
    tag, field = {api_pb2.Experiment: (metadata.EXPERIMENT_TAG, "experiment"),
                  SessionStartInfo: (metadata.SESSION_START_INFO_TAG, "session_start_info"),
                  SessionEndInfo: (metadata.SESSION_END_INFO_TAG, "session_end_info")}[type(record)]
    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(HParamsPluginData(**{field: record})),
                      tensor=metadata.NULL_TENSOR)
    return summary


class LearningRate(L.Callback):
    """`train/lr`: the lr of the optimizer step about to be taken, at the steps where Lightning logs the loss
    (each log_every_n_steps-th step, at the same step number). Every parameter group follows one schedule, so one
    curve says it all; when groups differ (an optimizer with per-group rates) each gets `train/lr/<name or pgN>`."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        if not trainer.loggers or (step + 1) % trainer.log_every_n_steps or not first_micro_batch:
            return
        groups = trainer.optimizers[0].param_groups
        lrs = {g.get("name", f"pg{i}"): g["lr"] for i, g in enumerate(groups)}
        if len(set(lrs.values())) == 1:
            lrs = {"train/lr": groups[0]["lr"]}
        else:
            lrs = {f"train/lr/{name}": lr for name, lr in lrs.items()}
        for logger in trainer.loggers:
            logger.log_metrics(lrs, step=step)


def scalar(value) -> float | str:
    """A value for TensorBoard's hparams: numbers and strings as they are; booleans, null, lists and dicts as the
    strings YAML would write (true, null, [0.9, 0.95])."""
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) else json.dumps(value)


def run_hparams(cfg: DictConfig, run: ResolvedRun, model: nn.Module) -> dict[str, float | str]:
    """The run's chosen values, flattened: the groups chosen, the effective model, the optimizer, schedule, data
    and length of training, the stage, every key overridden on the command line, and the trainable share."""
    hp: dict = {}
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    choices = hydra.runtime.choices if hydra else {}
    hp |= {g: choices[g] for g in GROUPS if choices.get(g)}
    hp |= {f"model.{k}": v for k, v in asdict(run.model_config).items()}
    hp |= {f"optimizer.{k}": v for k, v in cfg.optimizer.items() if not k.startswith("_")}
    hp |= {f"scheduler.{k}": v for k, v in cfg.scheduler.items()}
    hp |= {"data.path": cfg.data.path, "data.tokenizer": run.tokenizer, "data.batch_size": cfg.data.batch_size,
           "data.context_length": run.context_length, "trainer.max_steps": cfg.trainer.max_steps,
           "trainer.accumulate_grad_batches": run.accumulate, "trainer.precision": str(run.precision),
           "trainer.devices": cfg.trainer.devices, "trainer.num_nodes": cfg.trainer.num_nodes,
           "finetune.train_blocks": cfg.finetune.train_blocks, "init_from": cfg.init_from, "seed": cfg.seed}
    if cfg.finetune.lora:
        hp |= {f"finetune.lora.{k}": v for k, v in cfg.finetune.lora.items()}
    for key in overridden_keys():  # whatever else the command line set (the effective values above stay)
        hp.setdefault(key, choices[key] if key in choices else OmegaConf.select(cfg, key, default=None))
    trainable, _, fraction = trainable_summary(model)
    hp |= {"model.trainable_params": trainable, "model.trainable_fraction": fraction}
    return {k: scalar(v) for k, v in hp.items()}


def overridden_keys() -> list[str]:
    """The keys (and groups) set on this run's command line."""
    return [override_key(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def log_hparams(loggers: list, params: dict[str, float | str], stage: Stage) -> None:
    """The run's values for TensorBoard's HPARAMS tab, compared on the stage's final metrics (the last value of each
    curve val/<metric>, i.e. the final validation); the keys a sweep varies (or, in a single run, those set on the
    command line) listed first. The other trackers (run/trackers.py) get the values through their own
    `log_hyperparams` and show each metric's last value themselves."""
    for logger in loggers:
        if isinstance(logger, TensorBoard):
            metrics = tuple(f"val/{m}" for m in stage.compared or stage.metrics)
            logger.log_run(params, metrics, varied_keys() or set(overridden_keys()), sweep_trial_name())
        else:
            logger.log_hyperparams(params)
