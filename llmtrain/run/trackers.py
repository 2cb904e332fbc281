"""The trackers other than TensorBoard (run/board.py): Lightning's own CSV, MLflow and W&B loggers, each given what
a run shows in TensorBoard: every metric without Lightning's `epoch` value, the run's values (`log_hyperparams`),
a name from the overrides its sweep varies (conf/logger/*.yaml: `${run_name:...}`), and the text samples where
the tracker has text (`log_samples`: an MLflow artifact per sample and step, a W&B table per step; a CSV has none).

MLflow and W&B are optional (`pip install 'llmtrain[track]'`) and imported only when their logger is built:
Hydra imports the class of the logger chosen, and this file imports neither at the top.
"""

from __future__ import annotations

import importlib

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from llmtrain.errors import UserError
from llmtrain.run.checks import missing_tracker


def require(package: str) -> None:
    """A UserError naming the extra to install when `package` (a tracker's) is missing (a run finds it earlier, in
    checks.tracker_problems; this is for a logger built outside one)."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(missing_tracker(package)) from None


class WithoutEpoch:
    """Drops the `epoch` value that Lightning adds to every logged dict (runs are measured in steps)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class CSV(WithoutEpoch, CSVLogger):
    """<save_dir>/<name>/<version>/metrics.csv (a row per step, a column per metric) and hparams.yaml."""


class MLflow(WithoutEpoch, MLFlowLogger):
    """An MLflow run in the store at `tracking_uri` (by default a SQLite database under outputs/, conf/logger/
    mlflow.yaml). The run ends FINISHED or FAILED with the fit."""

    def __init__(self, **kwargs) -> None:
        require("mlflow")
        super().__init__(**kwargs)

    @rank_zero_only
    def log_samples(self, samples: dict[str, str], step: int) -> None:
        """Each sample as a text artifact, `<name>/step_<step>.txt` (e.g. samples/0/step_000030.txt)."""
        for name, text in samples.items():
            self.experiment.log_text(self.run_id, text, f"{name}/step_{step:06d}.txt")


class Wandb(WithoutEpoch, WandbLogger):
    """A W&B run; with `offline: true` (conf/logger/wandb.yaml) files only, under <save_dir>/wandb/offline-run-*,
    which `wandb sync` uploads later.

    Lightning finalizes its loggers after each of fit, validate and test, and the recipe validates and tests after
    fit, so the run cannot end there: the recipe ends it when it is done (`finish_runs`), or at once, marked failed,
    when the fit fails. A run left open otherwise is finished when the next job of a multirun builds its logger (a
    run of its own rather than Lightning's reuse of the open one), else by wandb's exit hook."""

    def __init__(self, **kwargs) -> None:
        require("wandb")
        import wandb

        if wandb.run is not None:  # the previous job's, in a multirun's process
            wandb.run.finish()
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous")  # Lightning passes it always; wandb warns that it has no effect

    @rank_zero_only
    def log_samples(self, samples: dict[str, str], step: int) -> None:
        """The samples as one table per step (columns name, text): W&B shows it with a step slider."""
        self.log_text("samples", columns=["name", "text"], data=[[n, t] for n, t in samples.items()], step=step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "failed" and self._experiment is not None:
            self._experiment.finish(exit_code=1)

    @rank_zero_only
    def finish(self) -> None:
        """End the run, its files written (offline) or sent, before the next job or the process's end."""
        if self._experiment is not None:
            self._experiment.finish()
            self._experiment = None


def finish_runs(loggers: list) -> None:
    """End the runs of the trackers that keep one open past Lightning's finalize (W&B), once the recipe has logged
    its last value."""
    for logger in loggers:
        if isinstance(logger, Wandb):
            logger.finish()
