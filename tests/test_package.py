"""The package works where it is installed: the wheel holds every module and config, and the installed command runs
from any directory, with groups and presets from a user's own config folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# A user's own config folder: a preset in one of our groups, and a group of their own.
USER_MODEL = """\
vocab_size: 257
context_length: 32
emb_dim: 32
n_heads: 2
n_layers: 2
drop_rate: 0.0
qkv_bias: false
tie_weights: true
"""
USER_GROUP = """\
# @package _global_
data:
  tokenizer: bytes
  batch_size: 8
  max_documents: 200
trainer:
  accelerator: cpu
  max_steps: 5
  val_check_interval: 5
  limit_val_batches: 2
  log_every_n_steps: 1
scheduler:
  warmup_steps: 1
callbacks:
  progress_bar: null
"""


def listed_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_pyproject_lists_every_package_and_config_group():
    """setuptools ships only the packages listed; a new module folder or config group must be added there."""
    folders = {"llmtrain." + ".".join(p.relative_to(ROOT / "llmtrain").parts) for p in (ROOT / "llmtrain").rglob("*")
               if p.is_dir() and p.name != "__pycache__"}
    groups = {"llmtrain.conf." + ".".join(p.relative_to(ROOT / "conf").parts) for p in (ROOT / "conf").rglob("*")
              if p.is_dir()}
    assert listed_packages() == {"llmtrain", "llmtrain.conf"} | folders | groups


def copy_tree(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), so that building leaves nothing in the checkout."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".*", "outputs", "multirun", "build", "dist",
                                                                  "*.egg-info", "__pycache__"))
        return dest
    for name in filter(None, names):
        if (ROOT / name).is_file():  # a tracked file deleted in the checkout is listed but absent
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the bin/ of a fresh virtual environment where it is installed, not editable).

    The environment sees this one's site-packages through a .pth path line, so that torch and the other
    dependencies are not downloaded again; such a line adds the folder alone, without running the .pth files in it,
    so an editable install of the checkout there stays out.
    """
    tmp = tmp_path_factory.mktemp("package")
    built = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                 "--wheel-dir", tmp / "dist", copy_tree(tmp / "src")], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "Package would be ignored" not in built.stderr, built.stderr[-3000:]
    wheel = next((tmp / "dist").glob("llmtrain-*.whl"))
    made = run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], cwd=tmp)
    assert made.returncode == 0, made.stderr
    venv_python = tmp / "venv" / "bin" / "python"
    site = run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.stdout.strip(), "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    done = run([sys.executable, "-m", "pip", "--python", venv_python, "install", "--quiet", "--no-deps",
                "--no-index", wheel], cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, tmp / "venv" / "bin"


@pytest.mark.slow
def test_the_wheel_holds_every_module_config_and_asset(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llmtrain").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    configs = {"llmtrain/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert tree | configs <= names, sorted((tree | configs) - names)
    assert "llmtrain/conf/config.yaml" in names and "llmtrain/assets/gpt2.tiktoken" in names


@pytest.mark.slow
def test_the_installed_command_runs_from_any_directory_with_a_users_config_folder(installed, tmp_path):
    _, bin_dir = installed
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "my_conf" / "model").mkdir(parents=True)
    (elsewhere / "my_conf" / "lab").mkdir()
    (elsewhere / "my_conf" / "model" / "my_tiny.yaml").write_text(USER_MODEL)
    (elsewhere / "my_conf" / "lab" / "quick.yaml").write_text(USER_GROUP)

    job = run([bin_dir / "llmtrain", "--cfg", "job"], cwd=elsewhere)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "emb_dim: 128" in job.stdout and "_target_: llmtrain.data.tokens.TextDataModule" in job.stdout

    trained = run([bin_dir / "python", "-m", "llmtrain", "--config-dir", "my_conf", "model=my_tiny", "+lab=quick",
                   "hydra.run.dir=run"], cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done: 5 steps" in trained.stdout
    assert "emb_dim: 32" in (elsewhere / "run" / ".hydra" / "config.yaml").read_text()  # the user's preset
    sources = yaml.safe_load((elsewhere / "run" / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    paths = {s["provider"]: Path(s["path"]) for s in sources["config_sources"]}
    assert paths["main"].parts[-2:] == ("llmtrain", "conf") and paths["main"].is_relative_to(bin_dir.parent)
    assert paths["command-line"] == elsewhere / "my_conf"  # the installed package's configs, then the user's
    assert (elsewhere / "run" / "hf" / "model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["my_conf", "run"]
