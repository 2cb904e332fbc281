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
