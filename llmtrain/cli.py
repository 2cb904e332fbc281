"""The command line: `python -m llmtrain [overrides]` (and the `llmtrain` script) composes the configs with Hydra,
checks the config and runs the recipe in train.py; a mistake a user can make ends in one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmtrain.errors import one_line_errors
from llmtrain.run.memory import preflight
from llmtrain.run.resolve import resolve_run
from llmtrain.run.rundir import discard

PACKAGE_DIR = Path(__file__).resolve().parent
# The configs: inside the package when installed from a wheel (pyproject.toml maps conf/ to llmtrain/conf), at the
# top of the repository in a checkout (and an editable install of it). A user's own folder adds groups and presets
# on top: --config-dir DIR, or hydra.searchpath=[file://DIR].
CONF_DIR = next((d for d in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf") if (d / "config.yaml").is_file()),
                PACKAGE_DIR / "conf")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    with one_line_errors(cleanup=lambda: discard(Path(cfg.run_dir), keep_saved=True)):
        run = resolve_run(cfg)
        preflight(cfg, run)  # before any process starts: a run that cannot fit stops here
        # Lightning, datasets and peft take seconds to import: the recipe is imported only once the config is
        # known to be good, so that `--help` and a mistaken override answer at once
        from llmtrain.run.train import train

        return train(cfg, run)

