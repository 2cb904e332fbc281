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
