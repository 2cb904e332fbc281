"""Hydra's side of a run: how the console reads, what a sweep job is called, the table at the end of a multirun,
and a debug run that leaves nothing behind.

Nothing here imports Lightning: the command line imports this module before the config is checked, and Hydra
builds the callbacks below before the first job starts.

- `ConsoleFormatter`: INFO lines as they are, other levels prefixed (see hydra.job_logging in conf/config.yaml).
- `${sweep_job:}` (conf/logger/tensorboard.yaml): in a multirun job, the overrides its sweep varies, e.g.
  `optimizer.lr=0.0003`, so that TensorBoard names the job's run by them rather than by the job's number;
  `${run_name:${run_dir}}` the same, or the run dir's name outside a multirun (MLflow's and W&B's run names).
- `write_metrics`: `<run_dir>/metrics.json`, the final metrics of a finished run.
- `SweepSummary` (hydra.callbacks): at the end of a multirun, its jobs best first (by val/loss, or the metric
  hydra.callbacks.sweep_summary.rank_by names), printed and written to `<sweep dir>/summary.md`.
- `DiscardRunDir` (debug=fast): removes what the job wrote once it is over (run/rundir.py says what that is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llmtrain.errors import UserError
from llmtrain.files import write_atomic
from llmtrain.run.distributed import in_multirun
from llmtrain.run.rundir import discard

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
MAX_NAME = 160  # characters of a run name kept as a folder name (file systems allow 255 bytes)


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO (the console is for reading); `WARNING: message` and so on for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


# ---- naming the jobs of a sweep ----

def override_key(override: str) -> str:
    """`optimizer.lr=1e-4` -> `optimizer.lr`; `+x=1` -> `x`; `model=gpt124m` -> `model` (a group)."""
    return OverridesParser.create().parse_overrides([override])[0].key_or_group


def swept_keys(sweep_overrides: list[str], sweeper_params: dict | None) -> set[str]:
    """The keys a sweep varies: those given as sweeps on its command line (`a,b`, `range(..)`, `interval(..)`)
    and those of the sweeper's search space (`hydra.sweeper.params`, e.g. the Optuna preset's)."""
    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(sweeper_params or {})


def job_label(job_overrides: list[str], keys: set[str]) -> str:
    """A job's overrides restricted to the swept keys (all of them when none is swept), comma-separated."""
    own = [o for o in job_overrides if override_key(o) in keys]
    return ",".join(own or job_overrides)


def folder_name(label: str) -> str:
    """`label` made safe as one folder name: no path separator; a long one is cut and given a short hash."""
    name = label.replace("/", "_")
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}~{hashlib.sha256(label.encode()).hexdigest()[:8]}"
    return name


def varied_keys() -> set[str]:
    """The keys the current multirun varies (none outside one): the basic sweeper saves the sweep's command line
    to <sweep dir>/multirun.yaml before the jobs start; other sweepers name their search space in the config."""
    if not in_multirun():
        return set()
    hc = HydraConfig.get()
    sweep = Path(hc.sweep.dir) / "multirun.yaml"
    sweep_overrides = list(OmegaConf.load(sweep).hydra.overrides.task) if sweep.is_file() else []
    return swept_keys(sweep_overrides, OmegaConf.select(hc, "sweeper.params"))


def sweep_job_name() -> str:
    """The `${sweep_job:}` resolver: in a multirun job, its label (e.g. `optimizer.lr=0.0003`, else its number);
    an empty string in a single run (TensorBoard's events then lie in tensorboard/ itself)."""
    if not in_multirun():
        return ""
    hc = HydraConfig.get()
    return folder_name(job_label(list(hc.overrides.task), varied_keys()) or str(hc.job.num))


def sweep_trial_name() -> str:
    """In a multirun job, its name in TensorBoard's HPARAMS table: its label, then its sweep's folder and job
    number, so that the jobs of two sweeps with the same values stay apart; "" in a single run."""
    if not in_multirun():
        return ""
    hc = HydraConfig.get()
    return f"{sweep_job_name()} ({Path(hc.sweep.dir).name}/{hc.job.num})"


def run_name(run_dir: str) -> str:
    """The `${run_name:${run_dir}}` resolver (conf/logger/mlflow.yaml, wandb.yaml): a tracker's name for the run,
    the job's label in a multirun, else the run dir's name."""
    return sweep_job_name() or Path(run_dir).name


if not OmegaConf.has_resolver("sweep_job"):  # registered on import: whoever composes conf/ imports llmtrain.cli
    OmegaConf.register_new_resolver("sweep_job", sweep_job_name)
    OmegaConf.register_new_resolver("run_name", run_name)


# ---- what a finished run reports, and the sweep's table ----

def write_metrics(run_dir: str | Path, metrics: dict[str, float]) -> Path:
    """`<run_dir>/metrics.json`: the final metrics of the run (val/loss, val/ppl or val/acc, ...) and its step."""
    path = Path(run_dir) / METRICS_FILE
    return write_atomic(path, json.dumps(metrics, indent=1) + "\n")  # a sweep summary reads it


def read_jobs(sweep_dir: Path, keys: set[str], rank_by: str = "val/loss", mode: str = "min") -> list[dict]:
    """Every job folder of a sweep (one with .hydra/overrides.yaml) with its label and final metrics (empty
    when the job did not finish), best `rank_by` first (the lowest with mode min, the highest with max), jobs
    without it next, a NaN last."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        metrics_file = job_dir / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        overrides = list(OmegaConf.load(overrides_file))
        jobs.append({"job": job_dir.name, "overrides": job_label(overrides, keys), "metrics": metrics,
                     "run_dir": str(job_dir)})
    sign = -1 if mode == "max" else 1
    value = lambda j: sign * j["metrics"].get(rank_by, sign * math.inf)  # noqa: E731
    return sorted(jobs, key=lambda j: (math.isnan(value(j)), value(j), j["job"]))


def cell(metrics: dict, name: str) -> str:
    if name not in metrics:
        return "-" if metrics else "not finished"
    return f"{metrics[name]:.2f}" if name.endswith(("ppl", "perplexity")) else f"{metrics[name]:.4f}"


def format_table(jobs: list[dict], rank_by: str = "val/loss") -> str:
    """The jobs as a Markdown table (aligned, so that it reads in a terminal too): the metric they are ranked by,
    the stage's and the benchmark tasks' (eval/)."""
    evals = sorted({m for j in jobs for m in j["metrics"] if m.startswith("eval/")})
    metrics = [m for m in dict.fromkeys((rank_by, "val/loss", "val/ppl", "val/acc", "val/f1", "test/acc", *evals))
               if any(m in j["metrics"] for j in jobs)]
    header = ["rank", "job", "overrides", *metrics, "run dir"]
    rows = [[str(i), j["job"], j["overrides"] or "(none)",
             *(cell(j["metrics"], m) for m in metrics), j["run_dir"]]
            for i, j in enumerate(jobs, 1)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class SweepSummary(Callback):
    """At the end of a multirun: the jobs ranked by a final metric of their metrics.json (`rank_by`, val/loss by
    default: what the sweepers minimise; `mode` max for an accuracy, e.g. eval/llmtrain_definitions/acc), with
    their overrides, metrics and run dirs, printed and written to `<sweep dir>/summary.md`.

    The jobs are read back from their folders (metrics.json, .hydra/overrides.yaml), so the table is the same
    whichever launcher ran them (in this process, SLURM, ...)."""

    def __init__(self, rank_by: str = "val/loss", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise UserError(f"hydra.callbacks.sweep_summary.mode must be min or max (max for an accuracy), "
                            f"got {mode!r}")
        self.rank_by, self.mode = rank_by, mode

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        keys = swept_keys(list(config.hydra.overrides.task), OmegaConf.select(config, "hydra.sweeper.params"))
        jobs = read_jobs(sweep_dir, keys, self.rank_by, self.mode)
        if not jobs:
            return
        table = format_table(jobs, self.rank_by)
        path = sweep_dir / SUMMARY_FILE
        order = f"best {self.rank_by} first ({'highest' if self.mode == 'max' else 'lowest'})"
        write_atomic(path, f"# Sweep summary: {len(jobs)} jobs, {order}\n\n{table}\n")
        print(f"sweep summary, {order} (also in {path}):\n{table}\n"
              f"compare the jobs in TensorBoard: tensorboard --logdir {sweep_dir}", flush=True)


class DiscardRunDir(Callback):
    """debug=fast: a run that keeps nothing. When the job ends, what it added to its run dir is removed (all of a
    run dir it created, with the parents it made while empty; in a dir that held files before, only its own)."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        if discard(run_dir):
            print(f"debug=fast: removed what the run wrote in {run_dir} (nothing is kept)", flush=True)
