"""End to end: the real config and command line train, log, checkpoint, resume, sweep and run DDP."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, read_scalars, run_cli

from llmtrain.run.train import train


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One 30-step run of the default pipeline (embedded corpus), shrunk to seconds; shared by the checks below."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(TINY, run_dir)
    final = train(cfg)
    return run_dir, final


def test_short_run_val_loss_falls_and_is_returned(short_run):
    run_dir, final = short_run
    scalars = read_scalars(run_dir)
    val = [v for _, v in sorted(scalars["val/loss"])]
    assert len(val) == 2
    assert final == pytest.approx(val[-1], rel=1e-5)
    assert val[-1] < val[0] < 5.6  # ln(257) = 5.55 is a uniform guess over the byte vocabulary
    train_loss = [v for _, v in sorted(scalars["train/loss"])]
    assert train_loss[-1] < train_loss[0]


def test_tensorboard_holds_the_metrics_a_user_watches(short_run):
    run_dir, _ = short_run
    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/ppl", "train/tokens_per_sec", "train/grad_norm", "train/lr/matrix",
                "train/lr/embedding"):  # pretraining's Muon: one lr per role (a single train/lr for AdamW)
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    # only train/ and val/ groups: no `epoch`, no lr card per parameter group (TensorBoard sorts groups by name)
    assert {t.split("/")[0] for t in scalars} == {"train", "val"}, sorted(scalars)
    ppl = dict(scalars["val/ppl"])
    loss = dict(scalars["val/loss"])
    for step, v in loss.items():
        assert ppl[step] == pytest.approx(float(torch.tensor(v).exp()), rel=1e-4)
    assert all(v > 0 for _, v in scalars["train/tokens_per_sec"])
    lr, embedding_lr = dict(scalars["train/lr/matrix"]), dict(scalars["train/lr/embedding"])
    assert sorted(lr) == sorted(dict(scalars["train/loss"]))  # at the steps of the loss it drove
    assert lr[4] == pytest.approx(0.02, rel=1e-6)  # warmup (5 steps) reaches the peak at the 5th step, then decays
    assert embedding_lr[4] == pytest.approx(0.1, rel=1e-6) and lr[29] < lr[4]  # the default model's untied table
    assert dict(scalars["train/lr/head"])[4] == pytest.approx(0.01, rel=1e-6)  # and its own head


def test_checkpoints_describe_themselves(short_run):
    run_dir, _ = short_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-step") for c in ckpts)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # no pickle
    assert ckpt["global_step"] == 30
    assert ckpt["llmtrain"]["model_config"]["emb_dim"] == 32
    assert ckpt["llmtrain"]["tokenizer"] == "bytes"
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples_done"] == 240  # 30 batches of 8
    assert len(ckpt["llmtrain_resume"]["rng"]) == 1  # one set of random states per rank


def test_the_final_model_is_exported_in_hugging_face_layout(short_run):
    import json

    from safetensors.torch import load_file

    from llmtrain.interop.pretrained import load_pretrained

    run_dir, _ = short_run
    assert not (run_dir / "model").exists()  # the earlier format is no longer written
    record = json.loads((run_dir / "hf" / "llmtrain.json").read_text())
    assert record["format"] == "llmtrain" and record["step"] == 30 and record["tokenizer"] == "bytes"
    assert record["model_config"]["emb_dim"] == 32 and record["num_classes"] is None and record["stage"] == "pretrain"
    assert json.loads((run_dir / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    weights = load_file(run_dir / "hf" / "model.safetensors")
    assert "transformer.wte.weight" in weights and "lm_head.weight" in weights  # the default model's head is untied
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    final = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model, info = load_pretrained(str(run_dir / "hf"))
    assert info.tokenizer == "bytes" and model.config.n_layers == 2
    exported = model.state_dict()
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the export is the last checkpoint's weights


def test_the_trainer_takes_the_resolved_accumulation_and_the_callbacks_as_configured(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from llmtrain.run.resolve import resolve_run
    from llmtrain.run.train import build_trainer

    cfg = compose([*TINY, "tokens_per_step=1024"], tmp_path)  # 1 device x 8 x 32 = 256 tokens per micro-step
    trainer = build_trainer(cfg, resolve_run(cfg))
    assert trainer.accumulate_grad_batches == 4
    assert trainer.progress_bar_callback is None  # callbacks.progress_bar=null: none, not Lightning's default one
    cfg = compose([o for o in TINY if o != "callbacks.progress_bar=null"], tmp_path)
    bar = build_trainer(cfg, resolve_run(cfg)).progress_bar_callback
    assert type(bar) is TQDMProgressBar and bar.refresh_rate == 20  # conf/callbacks' own


def test_a_new_run_in_a_run_dir_that_holds_checkpoints_is_refused_before_anything_is_built(tmp_path):
    """The unit of test_existing_checkpoints_are_not_overwritten_by_a_new_run (the command line, below)."""
    from llmtrain.errors import UserError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(UserError) as e:
        train(compose(TINY, tmp_path))
    assert str(e.value) == (f"{tmp_path} already holds checkpoints of an earlier run: resume it with ckpt_path=last, "
                            f"or leave hydra.run.dir unset for a new run dir")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "last.ckpt"]


def test_a_user_error_raised_while_building_reaches_the_user_as_it_is(tmp_path):
    from llmtrain.errors import UserError
    from llmtrain.run.train import build

    cfg = compose([*TINY, "data.val_fraction=1.5"], tmp_path)
    with pytest.raises(UserError) as e:  # raised by the data module's constructor, inside Hydra's instantiate
        build(cfg.data, context_length=32, tokenizer="bytes", seed=0)
    assert str(e.value) == "data.val_fraction must lie in (0, 1), got 1.5"


@pytest.mark.slow
def test_resume_continues_steps_optimizer_and_schedule_past_a_truncated_checkpoint(tmp_path):
    """A run of 20 steps, its last.ckpt then cut in half as a kill mid-save would leave it (and made the newest
    file): ckpt_path=auto passes over it, resumes from the newest checkpoint that loads (a best-step one) and runs
    to 30 with the schedule and AdamW's moments going on, not restarting."""
    run_dir = tmp_path / "run"
    adamw = [*TINY, "optimizer=adamw", "trainer.val_check_interval=10", f"hydra.run.dir={run_dir}"]
    first = run_cli([*adamw, "trainer.max_steps=20"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 20
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    os.utime(last, (time.time() + 5, time.time() + 5))
    longer = [*adamw, "trainer.max_steps=30", "ckpt_path=auto"]
    refused = run_cli(longer, cwd=tmp_path)  # a longer run is another schedule: said, and applied only when asked
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
        "this run changes trainer.max_steps against the checkpoint's run: resume with the checkpoint's values, or "
        "apply the new ones with resume.apply=[trainer.max_steps]"), refused.stderr[-2000:]
    second = run_cli([*longer, "resume.apply=[trainer.max_steps]"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"warning: skipping {last}: it does not load" in second.stderr
    assert "changed values: trainer.max_steps: 20 -> 30" in second.stderr
    after = torch.load(last, map_location="cpu", weights_only=False)
    assert after["global_step"] == 30
    assert after["lr_schedulers"][0]["last_epoch"] == 30  # the schedule went on, it did not restart warmup
    assert after["optimizer_states"][0]["state"][0]["step"] == 30  # AdamW's moments came back with their count
    steps = sorted(s for s, _ in read_scalars(run_dir)["train/loss"])
    assert steps[0] < 20 and steps[-1] >= 25 and all(s < 31 for s in steps)


@pytest.mark.slow
def test_existing_checkpoints_are_not_overwritten_by_a_new_run(tmp_path, short_run):
    run_dir, _ = short_run
    stamp = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    result = run_cli([*TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds another run's outputs" in result.stderr and "ckpt_path=auto" in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    assert not (run_dir / ".hydra").exists()  # refused before Hydra wrote its config there


@pytest.mark.slow
def test_ddp_two_cpu_ranks_through_the_command_line(tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_cli([*TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=10",
                      "trainer.val_check_interval=10", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "distributed_backend=gloo" in out
    assert out.count("done: 10 steps") == 1  # the summary comes from rank zero only
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1  # one rank writes TensorBoard
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10
    assert len(ckpt["llmtrain_resume"]["rng"]) == 2  # both ranks' random states, for an exact resume
    assert not (tmp_path / "outputs").exists()  # rank 1 shared the rank-0 run dir


@pytest.mark.slow  # a process of the command line
def test_python_m_llmtrain_works_from_another_directory(tmp_path):
    result = run_cli(["--cfg", "job", "model=gpt124m"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "emb_dim: 768" in result.stdout and "n_layers: 12" in result.stdout


# ---- bad input (each row of docs/errors.md is run by tests/test_errors.py) ----


@pytest.mark.slow
def test_unknown_group_option_names_the_choices(tmp_path):
    result = run_cli(["model=gpt9000"], cwd=tmp_path)
    assert result.returncode != 0
    assert "gpt9000" in result.stderr and "gpt124m" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_typo_in_a_key_is_caught_at_compose_time(tmp_path):
    result = run_cli(["model.n_layrs=3"], cwd=tmp_path)
    assert result.returncode != 0 and "n_layrs" in result.stderr and "Traceback" not in result.stderr


def test_a_stage_sets_its_own_steps_and_optimizer_over_the_groups_defaults(tmp_path):
    """Pretraining: Muon for 130 steps after 10 of warmup, on the untied gpt_tiny (the time-to-quality sweep's
    choice); DPO: its 200 steps at AdamW's lr 1e-5; the command line wins over both."""
    pre = compose([], tmp_path)
    assert pre.optimizer._target_.endswith("MuonAdamW") and (pre.trainer.max_steps, pre.trainer.val_check_interval) == (
        130, 75)
    assert pre.scheduler.warmup_steps == 10 and (pre.optimizer.embedding_lr, pre.optimizer.head_lr) == (0.1, 0.01)
    assert pre.model.tie_weights is False and pre.model.emb_dim == 128 and pre.model.n_layers == 4  # gpt_tiny's shape
    dpo = compose(["finetune=dpo"], tmp_path)
    assert dpo.optimizer._target_ == "torch.optim.AdamW" and dpo.optimizer.lr == 1e-5 and dpo.trainer.max_steps == 200
    old = compose(["optimizer=adamw", "trainer.max_steps=300"], tmp_path)  # the earlier defaults, by overrides
    assert old.optimizer._target_ == "torch.optim.AdamW" and old.trainer.max_steps == 300


def test_every_config_option_composes_and_validates(tmp_path):
    from llmtrain.cli import CONF_DIR
    from llmtrain.data.tokenizer_json import tokenizer_json
    from llmtrain.run.resolve import resolve_run

    (tmp_path / "x.txt").write_text("some text")
    stage_for_data = {"ClassifyDataModule": "classify", "InstructDataModule": "instruct",
                      "PreferenceDataModule": "dpo", "ChatDataModule": "chat"}
    from_scratch = ["model=gpt_tiny", "data.tokenizer=gpt2"]  # a stage without init_from needs a model and tokenizer
    needs_path = ("text", "json", "parquet", "preference_json", "preference_parquet", "chat_json",
                  "chat_parquet")  # their data.path is ???
    for group in ("model", "data", "optimizer", "scheduler", "finetune", "trainer", "logger", "callbacks",
                  "eval"):
        for option in sorted(Path(CONF_DIR, group).glob("*.yaml")):
            extra = [f"data.path={tmp_path / 'x.txt'}"] if option.stem in needs_path else []
            if group == "data":
                target = compose([f"data={option.stem}", *extra], tmp_path).data._target_.rsplit(".", 1)[-1]
                extra += [f"finetune={stage_for_data[target]}", *from_scratch] if target in stage_for_data else []
            if group == "finetune" and option.stem != "pretrain":
                extra += from_scratch
            if group == "model" and option.stem == "checkpoint":
                continue  # takes its values from init_from: tests/test_checks.py
            if group == "model" and compose([f"model={option.stem}"], tmp_path).model.vocab_size < 50257:
                small = tmp_path / "tokenizer.json"  # a vocabulary smaller than gpt2's: a tokenizer.json that fits
                small.write_text(tokenizer_json("bytes"))
                extra.append(f"data.tokenizer={small}")
            if group == "trainer" and option.stem in ("fsdp", "multinode"):
                extra.append("trainer.accelerator=auto")  # their accelerator=gpu is refused on a CPU machine
            cfg = compose([f"{group}={option.stem}", *extra], tmp_path)
            resolve_run(cfg)


@pytest.mark.slow
def test_ddp_started_by_torchrun(tmp_path):
    """torchrun starts both ranks itself (as SLURM does); Lightning picks up its environment."""
    import sys

    run_dir = tmp_path / "torchrun"
    args = [*TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6", "trainer.val_check_interval=6",
            "data.max_documents=350", f"hydra.run.dir={run_dir}"]  # a cache no other test made: rank 1 waits
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "llmtrain", *args], cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert out.count("done: 6 steps") == 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_as_its_own_group(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6",
                      "trainer.val_check_interval=6", "optimizer.lr=0.001,0.003", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert out.count("GLOBAL_RANK: 1, MEMBER: 2/2") >= 2  # a second rank joined each job
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no sweep started by a child
    for job, lr in (("0", 0.001), ("1", 0.003)):
        assert f"run dir {sweep / job}" in out
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 6
        assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(lr)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
