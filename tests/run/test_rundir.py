"""Run dirs (llmtrain/run/rundir.py): one run, one dir; only what this process created is ever removed."""

import multiprocessing
import os

import pytest
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from llmtrain.run import rundir
from llmtrain.run.jobs import DiscardRunDir


@pytest.fixture(autouse=True)
def fresh_claims(monkeypatch):
    setup_globals()  # Hydra's ${now:} (strftime leaves "t" as it is), as a run has it
    monkeypatch.setattr(rundir, "_claims", {})
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)


def _claim(path, queue):
    queue.put(str(rundir.claim(path).path))


def test_runs_started_in_the_same_second_get_a_dir_each(tmp_path):
    base = tmp_path / "outputs" / "runs" / "2026-12-03_10-00-00"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim, args=(base, queue)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    claimed = sorted(queue.get(timeout=5) for _ in workers)
    assert claimed == [str(base)] + [f"{base}_{n}" for n in (2, 3, 4)]


def test_a_claim_records_the_parents_it_made_and_discard_removes_them_while_empty(tmp_path):
    (tmp_path / "outputs").mkdir()
    claimed = rundir.claim(tmp_path / "outputs" / "runs" / "a")
    assert claimed.created == [tmp_path / "outputs" / "runs" / "a", tmp_path / "outputs" / "runs"]
    (claimed.path / ".hydra").mkdir()
    (claimed.path / "train.log").write_text("")
    assert rundir.discard(claimed.path) == claimed.created
    assert (tmp_path / "outputs").is_dir() and not any((tmp_path / "outputs").iterdir())  # it existed: it stays
    other = rundir.claim(tmp_path / "outputs" / "runs" / "b")
    (tmp_path / "outputs" / "runs" / "someone_else").mkdir()
    rundir.discard(other.path)
    assert sorted(p.name for p in (tmp_path / "outputs" / "runs").iterdir()) == ["someone_else"]  # in use: stays


def test_a_mistake_found_after_a_checkpoint_was_saved_removes_nothing(tmp_path):
    """A NaN loss or a full disk mid-run ends in one line naming the last good checkpoint: it must still be there."""
    claimed = rundir.claim(tmp_path / "runs" / "a")
    (claimed.path / "checkpoints").mkdir()
    (claimed.path / "checkpoints" / "last.ckpt").write_bytes(b"step 10")
    assert rundir.discard(claimed.path, keep_saved=True) == []
    assert (claimed.path / "checkpoints" / "last.ckpt").read_bytes() == b"step 10"
    assert rundir.discard(claimed.path) == claimed.created  # debug=fast's clean-up: all of it


def test_in_a_folder_that_existed_only_what_the_run_added_goes(tmp_path):
    """A SLURM job whose log is in the run dir keeps its log (and the folders above) when the config is wrong."""
    run_dir = tmp_path / "a" / "b" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "slurm-9.log").write_text("the log that holds the error")
    (run_dir / "notes").mkdir()
    rundir.found(run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("")
    (run_dir / "train.log").write_text("")
    assert sorted(p.name for p in rundir.discard(run_dir)) == [".hydra", "train.log"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes", "slurm-9.log"]
    assert (run_dir / "slurm-9.log").read_text() == "the log that holds the error"


def test_nothing_is_removed_from_a_dir_this_process_did_not_claim_or_find(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    assert rundir.discard(tmp_path / "run") == [] and (tmp_path / "run" / ".hydra").is_dir()


def test_a_sweep_job_is_new_unless_its_sweep_dir_listed_it_before(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "mine.txt").write_text("")
    rundir.found(sweep)
    (sweep / "1").mkdir()
    (sweep / "1" / "train.log").write_text("")
    assert rundir.discard(sweep / "1") == [sweep / "1"] and not (sweep / "1").exists()
    assert rundir.discard(sweep / "0") == [] and (sweep / "0" / "mine.txt").is_file()


def hydra_config(tmp_path, key, dir_value, ckpt_path=None):
    other = "sweep" if key == "run" else "run"
    return OmegaConf.create({"ckpt_path": ckpt_path, "hydra": {
        key: {"dir": dir_value}, other: {"dir": "unused"}, "overrides": {"hydra": []}}})


def test_a_timestamped_run_dir_is_claimed_and_a_second_one_gets_a_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for expected in ("outputs/runs/t", "outputs/runs/t_2"):
        config = hydra_config(tmp_path, "run", "outputs/runs/${now:t}")
        rundir.RunDirs().on_run_start(config)
        assert config.hydra.run.dir == str(tmp_path / expected) and (tmp_path / expected).is_dir()


def test_a_sweep_dir_claimed_is_named_in_the_overrides_each_job_is_composed_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "multirun" / "t").mkdir(parents=True)  # an earlier sweep of the same second
    config = hydra_config(tmp_path, "sweep", "outputs/multirun/${now:t}")
    rundir.RunDirs().on_multirun_start(config)
    claimed = tmp_path / "outputs" / "multirun" / "t_2"
    assert config.hydra.sweep.dir == str(claimed)
    assert list(config.hydra.overrides.hydra) == [f"hydra.sweep.dir={claimed}"]


def test_a_named_dir_holding_another_run_is_refused_unless_resuming(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(SystemExit) as e:
        rundir.RunDirs().on_run_start(hydra_config(tmp_path, "run", str(run_dir)))
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: hydra.run.dir={run_dir} already holds another run's outputs: resume it with ckpt_path=auto, "
        "or choose another hydra.run.dir (unset, each run gets a new one)\n")
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "seed: 1\n"
    rundir.RunDirs().on_run_start(hydra_config(tmp_path, "run", str(run_dir), ckpt_path="auto"))  # a resume
    sweep = tmp_path / "sweep"
    (sweep / "0" / "checkpoints").mkdir(parents=True)
    (sweep / "0" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        rundir.RunDirs().on_multirun_start(hydra_config(tmp_path, "sweep", str(sweep)))
    fresh = tmp_path / "fresh" / "run"
    rundir.RunDirs().on_run_start(hydra_config(tmp_path, "run", str(fresh)))
    assert fresh.is_dir() and rundir.discard(fresh) == [fresh, fresh.parent]


def test_a_rank_the_launcher_started_claims_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("")
    config = hydra_config(tmp_path, "run", str(run_dir))
    rundir.RunDirs().on_run_start(config)  # the launch rank's dir: no refusal
    assert rundir._claims == {} and rundir.discard(run_dir) == []
    assert config.hydra.output_subdir is None  # no .hydra/ of its own, which rank 0 would take for an earlier run


def test_debug_fast_removes_what_its_job_wrote_and_nothing_else(tmp_path, capsys):
    new = rundir.claim(tmp_path / "runs" / "new").path
    old = tmp_path / "runs" / "old"
    (old / "checkpoints").mkdir(parents=True)
    rundir.found(old)
    for run_dir in (new, old):
        (run_dir / "hf").mkdir()  # what the run writes
        DiscardRunDir().on_job_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}}), None)
    assert not new.exists() and sorted(os.listdir(old)) == ["checkpoints"]
    assert f"removed what the run wrote in {new}" in capsys.readouterr().out
