"""What a run does when training goes wrong."""

from conftest import TINY, run_cli

EXPLODE = ["optimizer.lr=1e30", "optimizer.schedule.min_lr=0", "optimizer.schedule.warmup_steps=0",
           "trainer.gradient_clip_val=null", "trainer.max_steps=20", "trainer.val_check_interval=10"]


def test_nonfinite_loss_stops_at_that_step_with_one_line(tmp_path):
    result = run_cli([*TINY, *EXPLODE, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training loss is nan at step 1; last good checkpoint: none yet")
    assert "Traceback" not in result.stderr


def test_nonfinite_batches_can_be_skipped_up_to_a_limit(tmp_path):
    result = run_cli([*TINY, *EXPLODE, "max_nonfinite_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "(skipped so far: 2)" in result.stderr.strip().splitlines()[-1]
    assert "(1 of max_nonfinite_steps=2)" in result.stderr and "(2 of max_nonfinite_steps=2)" in result.stderr


def test_sigterm_saves_and_a_restart_with_ckpt_path_auto_resumes_in_place(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from conftest import read_scalars

    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "trainer.val_check_interval=100000", "ckpt_path=auto",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("tensorboard/events.out.tfevents.*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # well into training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in out and "ckpt_path=auto" in out
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stopped_at = saved["global_step"]
    assert 0 < stopped_at < 100000

    again = run_cli([*args[:-2], f"trainer.max_steps={stopped_at + 10}", "trainer.val_check_interval=5",
                     "ckpt_path=auto", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert f"done: {stopped_at + 10} steps" in again.stdout, again.stdout[-2000:]
    assert resumed["global_step"] == stopped_at + 10, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # the same run's curves go on
    steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
    assert max(steps) > stopped_at


def test_ckpt_path_auto_passes_over_a_truncated_checkpoint(tmp_path):
    import os
    import time

    import torch

    run_dir = tmp_path / "run"
    first = run_cli([*TINY, "trainer.max_steps=10", "trainer.val_check_interval=5", f"hydra.run.dir={run_dir}"],
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a save cut short by a kill
    os.utime(last, (time.time() + 5, time.time() + 5))  # and the newest file in the folder
    again = run_cli([*TINY, "trainer.max_steps=15", "trainer.val_check_interval=5", "ckpt_path=auto",
                     f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"warning: skipping {last}: it does not load" in again.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 15


# A run that crosses epochs (about 25 batches each), with dropout (so the random state matters) and with
# gradient accumulation (checkpoints fall between optimizer steps, not between batches).
EXACT = [*TINY, "data.max_documents=60", "model.drop_rate=0.1", "trainer.max_steps=36",
         "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
         "checkpoint_every=5"]


def test_a_run_killed_mid_epoch_resumes_with_bit_identical_losses(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch
    from conftest import read_scalars

    whole = run_cli([*EXACT, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = dict(read_scalars(tmp_path / "whole")["train/loss"])
    assert sorted(expected) == list(range(36))  # one loss per optimizer step

    run_dir = tmp_path / "killed"
    args = [*EXACT, "ckpt_path=auto", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    saved_at = 0
    while saved_at < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            saved_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        except Exception:  # not written yet
            pass
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 10 <= step < 36

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done: 36 steps" in again.stdout
    got = read_scalars(run_dir)["train/loss"]  # the killed run's events, then the resumed run's
    assert {s for s, _ in got} == set(expected)
    mismatched = [(s, v, expected[s]) for s, v in got if v != expected[s]]
    assert not mismatched, mismatched[:5]


def test_a_checkpoint_write_cut_short_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import torch

    from llmtrain.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    try:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    except OSError:
        pass
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_gpu_checks_with_a_simulated_gpu(tmp_path, monkeypatch):
    """More devices than GPUs, and bf16 on a GPU without it: rows that need a GPU, checked against a fake one."""
    import pytest
    import torch
    from conftest import compose

    from llmtrain.errors import UserError
    from llmtrain.train import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(UserError) as e:
        validate(compose(["trainer.devices=4", "trainer.precision=bf16-mixed"], tmp_path))
    assert str(e.value) == (
        "trainer.devices=4 but this machine has 2 GPUs: set trainer.devices=2 or fewer; "
        "trainer.precision=bf16-mixed but Tesla V100-SXM2-16GB has no bf16 support (it needs an Ampere or newer "
        "GPU): use trainer.precision=16-mixed or 32-true")
    validate(compose(["trainer.devices=2", "trainer.precision=16-mixed"], tmp_path))  # what the message proposes
