"""The trackers besides TensorBoard (llmtrain/run/trackers.py, conf/logger/): each read back through its own reader
(the CSV file, MLflow's client on its SQLite store, W&B's offline run file), and a real 2-job sweep logged to all
of them at once (logger=many)."""

import csv
import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose, read_hparams, read_scalars, run_cli, subprocess_env

from llmtrain.errors import UserError
from llmtrain.run.board import TensorBoard
from llmtrain.run.resolve import resolve_run
from llmtrain.run.trackers import CSV
from llmtrain.run.train import build_loggers

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def read_csv(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def wandb_run(run_dir: Path, n: int = 0, wait: float = 20) -> dict:
    """The n-th W&B offline run under run_dir, read from its run-<id>.wandb file: W&B's protobuf records in the
    LevelDB log format that file uses (32 KiB blocks; each record chunk: crc32, length, type; a 7-byte W&B
    header first), the reader W&B itself no longer ships in Python. -> name, config, history rows, exit code.
    W&B's service process writes the file after `finish` returns: read again until the run's end is in it."""
    deadline = time.monotonic() + wait
    while (run := read_wandb_file(run_dir, n))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return run


def read_wandb_file(run_dir: Path, n: int) -> dict:
    from wandb.proto import wandb_internal_pb2

    [path] = sorted(run_dir.glob("wandb/offline-run-*"))[n].glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    run: dict = {"config": {}, "history": [], "exit_code": None, "dir": path.parent}
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        chunk, what = b"", record.WhichOneof("record_type")
        if what == "run":
            run["name"] = record.run.display_name
        elif what == "config":
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif what == "history":
            items = record.history.item
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif what == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def mlflow_runs(store: Path) -> dict:
    """run name -> (MlflowClient, run) for every run of the `llmtrain` experiment in the SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("llmtrain")
    return {r.info.run_name: (client, r) for r in client.search_runs([experiment.experiment_id])}


def test_many_builds_each_tracker_of_its_list_and_leaves_out_one_removed_or_set_to_null(tmp_path):
    cfg = compose(["logger=many", "~logger.mlflow", "~logger.wandb"], tmp_path)
    assert [type(lg) for lg in build_loggers(cfg.logger)] == [TensorBoard, CSV]
    cfg.logger.tensorboard = None  # as an experiment file may set it
    assert [type(lg) for lg in build_loggers(cfg.logger)] == [CSV]
    assert build_loggers(None) == []  # logger: null (debug=fast)


def log_a_run(logger, status: str = "success") -> None:
    """What Lightning and the recipe hand a logger: the run's values, metrics with Lightning's `epoch`, samples."""
    logger.log_hyperparams({"optimizer.lr": 3e-4, "model": "gpt_tiny"})
    logger.log_metrics({"train/loss": 2.5, "epoch": 0}, step=4)
    logger.log_metrics({"train/loss": 2.0, "val/loss": 2.25, "epoch": 0}, step=9)
    if hasattr(logger, "log_samples"):
        logger.log_samples({"samples/0": "The **cat**"}, step=10)
    logger.finalize(status)


def test_csv_keeps_every_metric_in_a_row_per_step_and_the_values(tmp_path):
    [logger] = build_loggers(compose(["logger=csv"], tmp_path).logger)
    log_a_run(logger)
    rows = read_csv(tmp_path / "csv")
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [("4", "2.5", ""), ("9", "2.0", "2.25")]
    assert "epoch" not in rows[0]
    assert yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text()) == {"optimizer.lr": 3e-4,
                                                                                 "model": "gpt_tiny"}


@pytest.mark.slow  # creating an MLflow database takes seconds (its schema migrations)
def test_mlflow_keeps_every_metric_the_values_a_name_and_the_samples_in_its_sqlite_store(tmp_path):
    store = tmp_path / "outputs" / "mlflow.db"
    cfg = compose(["logger=mlflow", f"logger.tracking_uri=sqlite:///{store}",
                   f"logger.artifact_location={tmp_path}/outputs/mlartifacts"], tmp_path / "run")
    [logger] = build_loggers(cfg.logger)
    log_a_run(logger)
    [(name, (client, run))] = mlflow_runs(store).items()
    assert name == "run" and run.info.status == "FINISHED"  # a single run: named by its run dir
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(4, 2.5), (9, 2.0)]
    assert sorted(run.data.metrics) == ["train/loss", "val/loss"]  # no epoch
    assert run.data.params == {"optimizer.lr": "0.0003", "model": "gpt_tiny"}
    assert run.data.tags["run_dir"] == str(tmp_path / "run")
    text = client.download_artifacts(run.info.run_id, "samples/0/step_000010.txt", str(tmp_path))
    assert Path(text).read_text() == "The **cat**"
    assert run.info.artifact_uri.startswith(str(tmp_path / "outputs" / "mlartifacts"))


def test_wandb_runs_offline_one_run_per_job_and_a_failed_fit_ends_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # as the logger sets it for the process; restored after the test
    for job, status in enumerate(("success", "failed")):  # two jobs of a multirun, in one process
        [logger] = build_loggers(compose(["logger=wandb"], tmp_path / str(job)).logger)
        log_a_run(logger, status)
    first, second = wandb_run(tmp_path / "0"), wandb_run(tmp_path / "1")
    assert first["name"] == "0" and second["name"] == "1"  # each job a run of its own, named by its run dir
    assert {k: v for k, v in first["config"].items() if not k.startswith("_")} == {"optimizer.lr": 3e-4,
                                                                                    "model": "gpt_tiny"}
    metrics = [{k: v for k, v in row.items() if not k.startswith("_")} for row in first["history"]]
    assert metrics[:2] == [{"train/loss": 2.5, "trainer/global_step": 4},
                           {"train/loss": 2.0, "val/loss": 2.25, "trainer/global_step": 9}]  # no epoch
    [table] = (first["dir"] / "files" / "media" / "table").glob("samples_*.table.json")
    assert json.loads(table.read_text())["data"] == [["samples/0", "The **cat**"]]
    assert (first["exit_code"], second["exit_code"]) == (0, 1)


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as without the package
    message = "logger=wandb needs the wandb package: pip install 'llmtrain[track]' (or choose another logger, e.g. " \
              "logger=tensorboard)"
    for logger in (["logger=wandb"], ["logger=many"]):
        cfg = compose([*TINY, *logger], tmp_path)
        with pytest.raises(UserError) as raised:
            resolve_run(cfg)  # with the config's other checks, before anything is built
        assert str(raised.value) == message
    with pytest.raises(UserError, match=re.escape(message)):
        build_loggers(compose(["logger=wandb"], tmp_path).logger)  # a logger built outside a run


@pytest.mark.slow
def test_the_default_logger_imports_neither_mlflow_nor_wandb(tmp_path):
    import subprocess

    code = ("import sys; from conftest import compose; from llmtrain.run.train import build_loggers; "
            f"build_loggers(compose([], __import__('pathlib').Path({str(tmp_path)!r})).logger); "
            "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env((Path(__file__).parent.parent,)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- a real sweep, logged to every tracker ----

SHORT = ["trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.limit_val_batches=4",
         "callbacks.checkpoint=null"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-job learning-rate sweep of the tiny model with logger=many, from the command line in tmp (where
    outputs/mlflow.db lands)."""
    tmp = tmp_path_factory.mktemp("trackers")
    result = run_cli(["-m", "optimizer.lr=1e-4,3e-3", *TINY, *SHORT, "logger=many",
                      f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


LABELS = {"0": "optimizer.lr=0.0001", "1": "optimizer.lr=0.003"}


@pytest.mark.slow
def test_a_sweep_logged_to_every_tracker_names_each_job_by_its_values_and_agrees_with_tensorboard(sweep):
    tmp, _ = sweep
    runs = mlflow_runs(tmp / "outputs" / "mlflow.db")
    assert sorted(runs) == sorted(LABELS.values())
    for job, label in LABELS.items():
        job_dir = tmp / "sweep" / job
        final = json.loads((job_dir / "metrics.json").read_text())
        board = read_scalars(job_dir)
        assert read_hparams(job_dir)["optimizer.lr"] == pytest.approx(float(label.split("=")[1]))  # TensorBoard's too
        steps = [s for s, _ in board["val/loss"]]

        client, run = runs[label]  # MLflow: the same curves, the run's values, a sample per validation
        assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(job_dir)
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert [m.step for m in history] == steps and history[-1].value == pytest.approx(final["val/loss"])
        assert sorted(run.data.metrics) == sorted(board)  # every metric TensorBoard has
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(float(label.split("=")[1]))
        assert run.data.params["model"] == "gpt_tiny_untied" and run.data.params["model.emb_dim"] == "32"
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples/0")]
        assert samples == ["samples/0/step_000005.txt", "samples/0/step_000010.txt"]
        assert Path(client.download_artifacts(run.info.run_id, samples[-1], str(tmp))).read_text().startswith("The **")

        rows = read_csv(job_dir / "csv" / label)  # CSV: its own folder named by the values
        assert [float(r["val/loss"]) for r in rows if r["val/loss"]][-1] == pytest.approx(final["val/loss"])
        assert {k for r in rows for k, v in r.items() if v} - {"step"} == set(board)
        hparams = yaml.safe_load((job_dir / "csv" / label / "hparams.yaml").read_text())
        assert hparams["optimizer.lr"] == pytest.approx(float(label.split("=")[1]))

        wb = wandb_run(job_dir)  # W&B, offline: the run's files
        assert wb["name"] == label and wb["exit_code"] == 0
        assert wb["config"]["optimizer.lr"] == pytest.approx(float(label.split("=")[1]))
        val = [(row["trainer/global_step"], row["val/loss"]) for row in wb["history"] if "val/loss" in row]
        assert [s for s, _ in val] == steps and val[-1][1] == pytest.approx(final["val/loss"])
        assert {k for row in wb["history"] for k in row if not k.startswith(("_", "trainer/", "samples"))} == \
            set(board)
        assert len(list((wb["dir"] / "files" / "media" / "table").glob("samples_*.table.json"))) == 2
