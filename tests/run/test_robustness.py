"""What a run does when training goes wrong: NaN, SIGTERM, SIGKILL, cut-off writes, GPU mismatches."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, read_scalars, run_cli, subprocess_env


def wait_until(ready, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    """Poll until ready() (a file written by the run, ...); fail with the run's output if it ends or times out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no {what} after {timeout_s:.0f} s (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)


EXPLODE = ["optimizer.lr=1e30", "scheduler.min_lr_ratio=0", "scheduler.warmup_steps=0",
           "trainer.gradient_clip_val=null", "trainer.max_steps=20", "trainer.val_check_interval=10"]


@pytest.mark.slow
def test_nonfinite_loss_stops_at_that_step_with_one_line(tmp_path):
    result = run_cli([*TINY, *EXPLODE, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training loss is nan at step 1; last good checkpoint: none yet")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_nonfinite_batches_can_be_skipped_up_to_a_limit(tmp_path):
    result = run_cli([*TINY, *EXPLODE, "max_nonfinite_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "(skipped so far: 2)" in result.stderr.strip().splitlines()[-1]
    assert "(1 of max_nonfinite_steps=2)" in result.stderr and "(2 of max_nonfinite_steps=2)" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_and_a_restart_with_ckpt_path_auto_resumes_in_place(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "trainer.val_check_interval=100000", "checkpoint_every=5",
            "ckpt_path=auto", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    wait_until(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), proc, "a first checkpoint")  # training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stopped_at = saved["global_step"]
    assert 0 < stopped_at < 100000
    assert f"stopped by SIGTERM at step {stopped_at}; newest checkpoint: {run_dir}/checkpoints/last.ckpt" in out
    assert "ckpt_path=auto" in out

    again = run_cli([*args[:-2], f"trainer.max_steps={stopped_at + 10}", "trainer.val_check_interval=5",
                     "resume.apply=[trainer.max_steps]", "ckpt_path=auto", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert f"done: {stopped_at + 10} steps" in again.stdout, again.stdout[-2000:]
    assert resumed["global_step"] == stopped_at + 10, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # the same run's curves go on
    steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
    assert max(steps) > stopped_at


@pytest.mark.slow
def test_sigterm_inside_an_accumulation_window_is_held_until_the_window_ends(tmp_path):
    """SIGTERM at the start of batch 7 (the 2nd of the window 6-8): the state is saved after batch 8's step."""
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "trainer.accumulate_grad_batches=3", "+callbacks.sigterm._target_=signals.SigtermAt",
                      "+callbacks.sigterm.batch=7", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                     extra_paths=(ROOT / "tests",))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 9
    assert f"stopped by SIGTERM at step 3; newest checkpoint: {run_dir}/checkpoints/last.ckpt" in result.stdout


# A run that crosses epochs (21 batches = 11 optimizer steps each: 10 windows of 2 batches, then 1), with
# dropout (so the random state matters) and gradient accumulation (saves must fall between windows).
EXACT = [*TINY, "data.max_documents=60", "model.drop_rate=0.1", "trainer.max_steps=36",
         "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The training losses of an uninterrupted run, per optimizer (each run once per module)."""
    runs: dict[str, dict[int, float]] = {}

    def losses_of(optimizer: str) -> dict[int, float]:
        if optimizer not in runs:
            run_dir = tmp_path_factory.mktemp("whole")
            whole = run_cli([*EXACT, f"optimizer={optimizer}", "checkpoint_every=5", f"hydra.run.dir={run_dir}"],
                            cwd=run_dir)
            assert whole.returncode == 0, whole.stderr[-3000:]
            runs[optimizer] = dict(read_scalars(run_dir)["train/loss"])
            assert sorted(runs[optimizer]) == list(range(36))  # one loss per optimizer step
        return runs[optimizer]

    return losses_of


def _run_and_kill(args: list[str], cwd: Path, last: Path, after_step: int) -> int:
    """Start a run, SIGKILL it once last.ckpt holds a step >= after_step; the step it holds then."""
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=subprocess_env())
    deadline, saved_at = time.monotonic() + 120, -1
    while saved_at < after_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            saved_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        except Exception:  # not there yet, or being replaced
            pass
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader workers: no chance to save anything more
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_a_run_killed_twice_resumes_with_bit_identical_losses(tmp_path, uninterrupted):
    """Killed right after the save at the end of epoch 0, resumed, killed again in the middle of epoch 1,
    resumed to the end: every step's training loss equals the uninterrupted run's, bit for bit, with
    pretraining's Muon (+ AdamW groups) and two DataLoader workers. (AdamW alone resumes bit for bit in
    tests/test_dpo.py, no workers; one killed run of each kind cost a minute of make test.)"""
    workers, optimizer = 2, "muon"
    run_dir = tmp_path / "killed"
    args = [*EXACT, f"optimizer={optimizer}", f"data.num_workers={workers}", "ckpt_path=auto",
            f"hydra.run.dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    first = _run_and_kill([*args, "checkpoint_every=11"], tmp_path, last, after_step=11)
    assert first in (11, 22)  # saved after the last batch of an epoch
    second = _run_and_kill([*args, "checkpoint_every=5"], tmp_path, last, after_step=first + 4)
    assert second % 5 == 0 and first < second < 33, second  # saved inside an epoch after the resume

    again = run_cli([*args, "checkpoint_every=5"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done: 36 steps" in again.stdout
    got = read_scalars(run_dir)["train/loss"]  # the killed runs' events, then the resumed run's
    whole = uninterrupted(optimizer)
    assert {s for s, _ in got} == set(whole)
    mismatched = [(s, v, whole[s]) for s, v in got if v != whole[s]]
    assert not mismatched, mismatched[:5]


@pytest.mark.slow
def test_a_run_killed_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL while half of step 10's checkpoint is on disk: last.ckpt still holds step 5, whole, and
    ckpt_path=auto resumes from it."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=15", "checkpoint_every=5", "ckpt_path=auto", f"hydra.run.dir={run_dir}"]
    killed = run_cli([*args, "+callbacks.kill._target_=signals.KillDuringSave", "+callbacks.kill.step=10"],
                     cwd=tmp_path, extra_paths=(ROOT / "tests",))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warning: skipping" not in again.stderr  # nothing cut short was left where a checkpoint belongs
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 15


def test_a_checkpoint_write_cut_short_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from llmtrain.training.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    from llmtrain.errors import UserError

    with pytest.raises(UserError, match=f"^could not write {path}: No space left on device"):  # one line
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_gpu_checks_with_a_simulated_gpu(tmp_path, monkeypatch):
    """More devices than GPUs, and bf16 on a GPU without it: rows that need a GPU, checked against a fake one."""
    from conftest import compose

    from llmtrain.errors import UserError
    from llmtrain.run.resolve import resolve_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(UserError) as e:
        resolve_run(compose(["trainer.devices=4", "trainer.precision=bf16-mixed"], tmp_path))
    assert str(e.value) == (
        "trainer.devices=4 but this machine has 2 GPUs: set trainer.devices=2 or fewer; "
        "trainer.precision=bf16-mixed but Tesla V100-SXM2-16GB has no bf16 support (it needs an Ampere or newer "
        "GPU): use trainer.precision=16-mixed or 32-true")
    resolve_run(compose(["trainer.devices=2", "trainer.precision=16-mixed"], tmp_path))  # what the message proposes
