"""Run dirs: one run, one dir, and llmtrain removes only what the same process created.

- A run dir named by the time (the default, `outputs/runs/<date>_<time>`; a sweep's `outputs/multirun/...`) is
  claimed with an exclusive `mkdir` before Hydra writes into it: a second run started in the same second gets
  `<name>_2`, a third `<name>_3`, and so on. They never share `.hydra/`, TensorBoard curves or checkpoints.
- A run dir the user names (`hydra.run.dir=...`, `hydra.sweep.dir=...`) is used as it is, but one that already
  holds another run (its `.hydra/config.yaml`, checkpoints) is refused in one line unless the run resumes
  (`ckpt_path=...`): Hydra would overwrite that run's config before anything else could say no.
- What the process found in the dir before Hydra wrote is remembered (`Claimed`). On a user's mistake (the
  command line's clean-up) and at the end of a `debug=fast` run, `discard` removes what this process added and
  nothing else: a folder it created goes with its contents, and its parents that it created while they are
  empty; in a folder that existed, only the entries it added go (`.hydra/`, `train.log`), the user's
  `slurm-1234.log` stays.

`RunDirs` is a Hydra callback (conf/config.yaml's hydra.callbacks); only the process a user started claims,
checks and removes. Ranks started beside it (torchrun, srun, Lightning's re-launch) do none of it and write no
`.hydra/` of their own, so that rank 0 never finds another rank's record and takes it for an earlier run.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from llmtrain.run.distributed import is_launch_rank


@dataclass
class Claimed:
    """A run dir as this process found it: the folders it created (the dir itself and the parents it made, deepest
    first) and, for a dir that existed, the names that were in it."""

    path: Path
    created: list[Path] = field(default_factory=list)
    before: set[str] = field(default_factory=set)


_claims: dict[Path, Claimed] = {}  # by resolved path: the run dirs (or sweep dirs) of this process


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it created, deepest first (the last one exclusively: FileExistsError when
    another process made it first)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in missing[:0:-1]:
        folder.mkdir(exist_ok=True)
    path.mkdir()
    return missing


def claim(path: Path) -> Claimed:
    """A new folder at `path`, or at `path_2`, `path_3`, ... when another run has it (exclusive mkdir: two
    processes never get the same one)."""
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
        try:
            created = make_dirs(candidate)
        except FileExistsError:
            n += 1
            continue
        return remember(Claimed(candidate.resolve(), [p.resolve() for p in created]))


def remember(claimed: Claimed) -> Claimed:
    _claims[claimed.path] = claimed
    return claimed


def found(path: Path) -> Claimed:
    """A folder the user named, as it is now: created (with its parents) if absent, its entries noted if not."""
    path = path.resolve()
    if path.is_dir():
        return remember(Claimed(path, before={p.name for p in path.iterdir()}))
    return remember(Claimed(path, make_dirs(path)))


def holds_a_run(path: Path) -> bool:
    """Whether a folder holds another run's outputs: Hydra's record of it, or checkpoints (a sweep dir: in a job)."""
    return any((d / ".hydra" / "config.yaml").is_file() or any(d.glob("checkpoints/*.ckpt"))
               for d in (path, *(p for p in path.iterdir() if p.is_dir())))


def discard(run_dir: Path, keep_saved: bool = False) -> list[Path]:
    """Remove what this process added to `run_dir` (see the module's docstring); the removed paths. With keep_saved
    (a mistake found mid-run: a NaN loss, a full disk) nothing goes once the run saved a checkpoint: the error
    names the last good one."""
    run_dir = run_dir.resolve()
    claimed = _claims.get(run_dir) or _job_of_a_claimed_sweep(run_dir)
    if claimed is None or not run_dir.is_dir() or (keep_saved and any(run_dir.glob("checkpoints/*.ckpt"))):
        return []
    if run_dir in claimed.created:  # all of it is this run's
        shutil.rmtree(run_dir, ignore_errors=True)
        removed = [run_dir]
        for parent in claimed.created[claimed.created.index(run_dir) + 1:]:
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                removed.append(parent)
        return removed
    added = [p for p in run_dir.iterdir() if p.name not in claimed.before]
    for p in added:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return added


def _job_of_a_claimed_sweep(job_dir: Path) -> Claimed | None:
    """A multirun job's dir: new (so all of it this job's) when its sweep dir did not list it before the sweep."""
    sweep = _claims.get(job_dir.parent)
    if sweep is None or job_dir.name in sweep.before:
        return None
    return remember(Claimed(job_dir, [job_dir]))


def _named_by_time(config: DictConfig, key: str) -> bool:
    """Whether a Hydra dir setting is the timestamped default rather than a name the user chose."""
    node = config.hydra[key]._get_node("dir")
    return "${now:" in str(node._value())


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _resumes(config: DictConfig) -> bool:
    return config.get("ckpt_path") not in (None, "")


class RunDirs(Callback):
    """Claims the run dir (or sweep dir) before Hydra writes into it; refuses one that holds another run."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._take(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        claimed = self._take(config, "sweep")
        if claimed is not None:  # each job's config is composed again from the overrides: name the dir there
            with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={claimed.path}")

    def _take(self, config: DictConfig, key: str) -> Claimed | None:
        if not is_launch_rank():  # ranks started beside it (torchrun, srun): its dir; Hydra's record is rank 0's
            with read_write(config.hydra):
                config.hydra.output_subdir = None
            return None
        if _named_by_time(config, key):
            claimed = claim(Path(str(config.hydra[key].dir)))
            with read_write(config.hydra[key]):
                config.hydra[key].dir = str(claimed.path)
            return claimed
        path = Path(str(config.hydra[key].dir))
        if path.is_dir() and holds_a_run(path) and not _resumes(config):
            what = "run" if key == "run" else "sweep"
            _refuse(f"hydra.{key}.dir={path} already holds another {what}'s outputs: resume it with ckpt_path=auto, "
                    f"or choose another hydra.{key}.dir (unset, each run gets a new one)")
        return found(path)
