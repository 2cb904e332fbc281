"""Hydra's side of a run (llmtrain/run/jobs.py): naming a sweep's jobs, the table at the end of a multirun, a debug run
that keeps nothing, the console's format."""

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmtrain.errors import UserError
from llmtrain.run.jobs import (
    ConsoleFormatter,
    SweepSummary,
    folder_name,
    job_label,
    read_jobs,
    swept_keys,
    write_metrics,
)


def test_the_keys_a_sweep_varies_come_from_its_command_line_and_its_search_space():
    sweep = ["optimizer.lr=1e-4,3e-4", "data.batch_size=8", "model=gpt_tiny,gpt124m", "+extra=range(1,3)",
             "trainer.max_steps=10"]
    assert swept_keys(sweep, {"optimizer.weight_decay": "interval(0, 0.2)"}) == {
        "optimizer.lr", "model", "extra", "optimizer.weight_decay"}
    assert swept_keys(["trainer.max_steps=10"], None) == set()


def test_a_job_is_labelled_by_the_values_its_sweep_varies():
    job = ["optimizer.lr=0.0003", "data.batch_size=8", "model=gpt124m"]
    assert job_label(job, {"optimizer.lr", "model"}) == "optimizer.lr=0.0003,model=gpt124m"
    assert job_label(job, set()) == ",".join(job)  # nothing swept (e.g. a sweeper's own space): every override
    assert folder_name("data.path=books/a.txt") == "data.path=books_a.txt"  # one folder, not two
    long = folder_name("x" * 400)
    assert len(long) <= 160 and long != folder_name("x" * 399)  # cut, and still tells them apart


def make_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        write_metrics(job, metrics)
    return job


def test_the_sweep_summary_ranks_the_jobs_by_val_loss_prints_and_writes_it(tmp_path, capsys):
    common = ["data.batch_size=8"]
    make_job(tmp_path, "0", ["optimizer.lr=0.0001", *common], {"step": 30, "val/loss": 5.41, "val/ppl": 224.5})
    make_job(tmp_path, "1", ["optimizer.lr=0.003", *common], {"step": 30, "val/loss": 3.55, "val/ppl": 34.97})
    make_job(tmp_path, "2", ["optimizer.lr=0.01", *common], None)  # stopped before the end
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": None},
                                         "overrides": {"task": ["optimizer.lr=1e-4,3e-3,1e-2", *common]}}})
    SweepSummary().on_multirun_end(config)

    printed = capsys.readouterr().out
    table = (tmp_path / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "0", "2"]  # best val/loss first, unfinished last
    assert rows[0].split("|")[3].strip() == "optimizer.lr=0.003"  # the swept value only, not data.batch_size
    assert "3.5500" in rows[0] and "34.97" in rows[0] and str(tmp_path / "1") in rows[0]
    assert "not finished" in rows[2]
    assert "| rank | job | overrides" in table and "val/acc" not in table  # a classifier's columns only for one
    assert all(r in printed for r in rows) and f"tensorboard --logdir {tmp_path}" in printed


def test_a_job_whose_val_loss_is_nan_ranks_last(tmp_path):
    """Best val/loss first, then unfinished jobs, then a diverged one: a NaN compares false with everything, so
    sorting by the loss alone would leave it wherever it was read."""
    make_job(tmp_path, "0", ["optimizer.lr=1"], {"val/loss": float("nan")})
    make_job(tmp_path, "1", ["optimizer.lr=0.1"], {"val/loss": 4.0})
    make_job(tmp_path, "2", ["optimizer.lr=0.01"], None)
    make_job(tmp_path, "3", ["optimizer.lr=0.001"], {"val/loss": 3.0})
    assert [j["job"] for j in read_jobs(tmp_path, {"optimizer.lr"})] == ["3", "1", "2", "0"]


def test_a_classifier_sweep_shows_accuracy(tmp_path, capsys):
    make_job(tmp_path, "0", ["optimizer.lr=0.001"], {"val/loss": 0.3, "val/acc": 0.91, "val/f1": 0.88})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}})
    SweepSummary().on_multirun_end(config)
    table = (tmp_path / "summary.md").read_text()
    assert "val/acc" in table and "0.9100" in table and "val/ppl" not in table


def test_a_sweep_ranks_by_a_benchmark_metric_highest_first_and_shows_every_eval_column(tmp_path, capsys):
    acc, bpb = "eval/llmtrain_definitions/acc", "eval/llmtrain_perplexity/bits_per_byte"
    make_job(tmp_path, "0", ["optimizer.lr=0.001"], {"val/loss": 3.0, acc: 0.31, bpb: 2.5})
    make_job(tmp_path, "1", ["optimizer.lr=0.01"], {"val/loss": 4.0, acc: 0.42, bpb: 2.9})
    make_job(tmp_path, "2", ["optimizer.lr=0.1"], {"val/loss": 2.0})  # evaluated nothing: after the others
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}})
    SweepSummary(rank_by=acc, mode="max").on_multirun_end(config)
    table = (tmp_path / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "0", "2"]
    header = [c.strip() for c in table.splitlines()[2].split("|")]
    assert header[4:7] == [acc, "val/loss", bpb]  # the ranking metric first
    assert "0.4200" in rows[0] and f"best {acc} first (highest)" in table
    assert [j["job"] for j in read_jobs(tmp_path, set(), acc, "min")] == ["0", "1", "2"]
    with pytest.raises(UserError, match="sweep_summary.mode must be min or max"):
        SweepSummary(mode="maximize")


@pytest.mark.parametrize("level, shown", [(logging.INFO, "hello"), (logging.WARNING, "WARNING: hello")])
def test_the_console_shows_info_lines_as_they_are(level, shown):
    record = logging.LogRecord("lightning", level, __file__, 1, "hello", None, None)
    assert ConsoleFormatter("%(message)s").format(record) == shown


def test_metrics_json_is_what_a_run_reports(tmp_path):
    path = write_metrics(tmp_path, {"step": 3, "val/loss": 1.5})
    assert json.loads(path.read_text()) == {"step": 3, "val/loss": 1.5}
