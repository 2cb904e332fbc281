"""benchmarks/gpu_check.sh without a GPU: its options, its cases, and that every case is a valid config."""

import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose

from llmtrain.run.resolve import resolve_run

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_list_names_the_four_cases():
    result = run("--list", "--gpus", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["bf16", "bf16-compile", "ddp", "fsdp"]
    assert "perf.compile=true" in lines[1] and "trainer.devices=2 trainer.strategy=ddp" in lines[2]
    assert lines[3].split()[1:3] == ["trainer=fsdp", "trainer.devices=2"]
    assert "model=gpt124m" in lines[4] and "data.context_length=1024" in lines[4] and "trainer.max_steps=20" in lines[4]


def test_every_case_is_a_config_that_the_checks_accept_on_a_gpu_machine(monkeypatch, tmp_path):
    result = run("--dry-run", "--gpus", "2", "--steps", "7", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 4 and all(c[:3] == ["python", "-m", "llmtrain"] for c in commands)
    cases = ("bf16", "bf16-compile", "ddp", "fsdp")
    assert [c[-1] for c in commands] == [f"hydra.run.dir={tmp_path}/{n}" for n in cases]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a simulated machine with two H100s
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    for command in commands:
        cfg = compose(command[3:-1], tmp_path)
        eff = resolve_run(cfg)
        assert eff.precision == "bf16-mixed" and cfg.trainer.max_steps == 7 and cfg.model.emb_dim == 768
        assert cfg.trainer.devices in (1, 2) and eff.context_length == 1024


@pytest.mark.parametrize("args, status, message", [
    (["--bogus"], 2, "error: unknown option --bogus (see --help)"),
    (["--steps", "x"], 2, "error: 'x' is not a whole number (see --help)"),
    (["--python", sys.executable], 1, f"error: no CUDA GPU visible to {sys.executable}: this check needs at least one"),
])
def test_mistakes_and_a_machine_without_a_gpu_end_in_one_line(args, status, message):
    result = run(*args, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, whatever the machine has
    assert result.returncode == status and result.stderr.startswith(message), result.stderr
