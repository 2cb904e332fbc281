"""What a run shows in TensorBoard (llmtrain/run/board.py): no epoch card, one learning-rate curve, the run's values in
the HPARAMS tab; and a real 2-job sweep read back through TensorBoard's own HTTP API."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, compose, read_hparams, read_scalars, run_cli, subprocess_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from llmtrain.model.gpt import GPT
from llmtrain.run.board import LearningRate, TensorBoard, run_hparams
from llmtrain.run.resolve import resolve_run


def hparams_records(log_dir: Path) -> dict[str, list]:
    """The hparams plugin's records in a run's events: experiment, session starts and ends, parsed."""
    parse = {metadata.EXPERIMENT_TAG: metadata.parse_experiment_plugin_data,
             metadata.SESSION_START_INFO_TAG: metadata.parse_session_start_info_plugin_data,
             metadata.SESSION_END_INFO_TAG: metadata.parse_session_end_info_plugin_data}
    found: dict[str, list] = {tag: [] for tag in parse}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag, content in acc.PluginTagToContent(metadata.PLUGIN_NAME).items():
            found[tag].append(parse[tag](content))
    return found


def test_the_logger_drops_the_epoch_card_and_records_the_run_for_the_hparams_tab(tmp_path):
    logger = TensorBoard(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    logger.log_metrics({"train/loss": 2.5, "epoch": 0}, step=4)  # what Lightning hands a logger
    params = {"optimizer.lr": 3e-4, "model": "gpt_tiny", "data.batch_size": 8}
    logger.log_run(params, ("val/loss", "val/ppl"), varied={"optimizer.lr"}, trial="optimizer.lr=0.0003 (s/1)")
    logger.finalize("success")

    assert sorted(read_scalars(tmp_path)) == ["train/loss"]
    records = hparams_records(tmp_path / "tensorboard")
    [experiment] = records[metadata.EXPERIMENT_TAG]
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss", "val/ppl"]
    infos = {h.name: h for h in experiment.hparam_infos}
    assert infos["optimizer.lr"].differs and not infos["model"].differs  # what TensorBoard lists first
    assert infos["model"].type == api_pb2.DATA_TYPE_STRING
    assert infos["data.batch_size"].type == api_pb2.DATA_TYPE_FLOAT64
    [start] = records[metadata.SESSION_START_INFO_TAG]
    assert start.group_name == "optimizer.lr=0.0003 (s/1)"
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(3e-4)
    assert start.hparams["model"].string_value == "gpt_tiny"
    assert [e.status for e in records[metadata.SESSION_END_INFO_TAG]] == [api_pb2.STATUS_SUCCESS]


def test_a_run_that_fails_ends_its_session_as_a_failure(tmp_path):
    logger = TensorBoard(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    logger.log_run({"seed": 1}, ("val/loss",), varied=set())
    logger.finalize("failed")  # what Lightning passes when fit raises
    ends = hparams_records(tmp_path / "tensorboard")[metadata.SESSION_END_INFO_TAG]
    assert [e.status for e in ends] == [api_pb2.STATUS_FAILURE]


class RecordingLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def lr_callback_logs(lrs: list[float], step: int, batch_idx: int = 0, accumulate: int = 1) -> list:
    logger = RecordingLogger()
    groups = [{"lr": lr} for lr in lrs]
    trainer = SimpleNamespace(global_step=step, log_every_n_steps=5, accumulate_grad_batches=accumulate,
                              loggers=[logger], optimizers=[SimpleNamespace(param_groups=groups)])
    LearningRate().on_train_batch_start(trainer, None, None, batch_idx)
    return logger.logged


def test_one_learning_rate_curve_at_the_steps_the_loss_is_logged():
    assert lr_callback_logs([1e-3, 1e-3], step=4) == [(4, {"train/lr": 1e-3})]  # decay and no-decay groups: one
    assert lr_callback_logs([1e-3, 1e-3], step=5) == []  # Lightning logs the loss at steps 4, 9, 14, ...
    assert lr_callback_logs([1e-3], step=4, batch_idx=5, accumulate=2) == []  # not again inside a window
    assert lr_callback_logs([1e-3, 2e-2], step=9) == [(9, {"train/lr/pg0": 1e-3, "train/lr/pg1": 2e-2})]


def test_the_run_values_are_flattened_for_tensorboard(tmp_path):
    cfg = compose([*TINY, "optimizer=adamw", "optimizer.lr=3e-4", "data.context_length=16",
                   "trainer.precision=32-true"], tmp_path)  # fp32 on any CPU
    eff = resolve_run(cfg)
    model = GPT(eff.model_config)
    hp = run_hparams(cfg, eff, model)
    assert hp["data.context_length"] == 16 and hp["model.context_length"] == 32  # the window, and the model's
    assert hp["optimizer.lr"] == pytest.approx(3e-4) and hp["model.emb_dim"] == 32
    assert hp["optimizer.betas"] == "[0.9, 0.95]" and hp["init_from"] == "null" and hp["model.qkv_bias"] == "false"
    assert hp["data.tokenizer"] == "bytes" and hp["trainer.precision"] == "32-true"
    assert hp["model.trainable_params"] == sum(p.numel() for p in model.parameters())
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in hp.values())


def test_the_command_line_keys_are_recorded_without_hiding_the_effective_values(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from llmtrain.cli import CONF_DIR

    overrides = [*TINY, "data.context_length=null", "trainer.gradient_clip_val=0.5", "model=gpt_tiny",
                 f"run_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(full)  # as in a run: its overrides and the groups chosen
    try:
        cfg = compose(overrides, tmp_path)
        eff = resolve_run(cfg)
        hp = run_hparams(cfg, eff, GPT(eff.model_config))
    finally:
        HydraConfig.instance().cfg = None
    assert hp["trainer.gradient_clip_val"] == 0.5 and hp["model"] == "gpt_tiny" and hp["data"] == "embedded"
    assert hp["data.context_length"] == 32  # the window in effect, not the null given
    assert hp["trainer.limit_val_batches"] == 20 and hp["callbacks.progress_bar"] == "null"


# ---- a real sweep, compared in TensorBoard ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_api(port: int, path: str, body: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-job learning-rate sweep of the tiny model from the command line."""
    tmp = tmp_path_factory.mktemp("sweep")
    result = run_cli(["-m", "optimizer.lr=1e-4,3e-3", *TINY, f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "sweep", result


@pytest.mark.slow
def test_a_multirun_sweeps_into_one_dir_and_ends_with_a_table_of_its_jobs_best_first(sweep):
    sweep_dir, result = sweep
    finals = {job: json.loads((sweep_dir / job / "metrics.json").read_text()) for job in ("0", "1")}
    for job in ("0", "1"):  # metrics.json holds the final validation, as TensorBoard does
        assert finals[job]["val/loss"] == pytest.approx(sorted(read_scalars(sweep_dir / job)["val/loss"])[-1][1])
    best = min(finals, key=lambda j: finals[j]["val/loss"])
    rows = [line for line in (sweep_dir / "summary.md").read_text().splitlines() if line.startswith("| 1 ")]
    assert rows and rows[0].split("|")[2].strip() == best
    assert rows[0].split("|")[3].strip() == {"0": "optimizer.lr=0.0001", "1": "optimizer.lr=0.003"}[best]
    assert rows[0] in result.stdout  # printed too
    for job, lr in (("0", "0.0001"), ("1", "0.003")):  # one sweep dir, a subdir per job, each a whole run
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        assert f"optimizer.lr={lr}" in (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_tensorboard_compares_the_jobs_of_a_sweep_in_its_hparams_tab(sweep):
    sweep_dir, _ = sweep
    for job, label in (("0", "optimizer.lr=0.0001"), ("1", "optimizer.lr=0.003")):  # each run named by its values
        assert (sweep_dir / job / "tensorboard" / label).is_dir()
        assert read_hparams(sweep_dir / job)["optimizer.lr"] == pytest.approx(float(label.split("=")[1]))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--port",
                               str(port), "--host", "127.0.0.1"], env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers and has read both runs
            try:
                if tensorboard_api(port, "/data/plugins_listing")["hparams"]["enabled"] and \
                        len(tensorboard_api(port, "/data/runs")) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "TensorBoard did not start"
            time.sleep(0.5)
        experiment = tensorboard_api(port, "/data/plugin/hparams/experiment", {"experimentName": ""})
        assert experiment["hparamInfos"][0]["name"] == "optimizer.lr"  # the swept key, listed first
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["val/loss", "val/ppl"]
        groups = tensorboard_api(port, "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "val/loss", "group": ""}, "order": "ORDER_ASC"}]})["sessionGroups"]
        lrs = {g["name"].split(" ")[0]: g["hparams"]["optimizer.lr"] for g in groups}
        assert lrs == {"optimizer.lr=0.0001": pytest.approx(1e-4), "optimizer.lr=0.003": pytest.approx(3e-3)}
        for g in groups:
            job = g["name"].split("/")[-1].rstrip(")")  # "optimizer.lr=0.003 (sweep/1)"
            final = json.loads((sweep_dir / job / "metrics.json").read_text())
            shown = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
            assert shown["val/loss"] == pytest.approx(final["val/loss"], rel=1e-5)
            assert shown["val/ppl"] == pytest.approx(float(torch.tensor(final["val/loss"]).exp()), rel=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)
