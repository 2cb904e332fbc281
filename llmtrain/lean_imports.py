"""A faster start: torchmetrics loaded without the two integrations llmtrain never uses.

Lightning imports torchmetrics (for a version check, and its logging result type), and torchmetrics' `__init__`
imports transformers (for BERTScore) and scipy.signal (for audio metrics) whenever they are installed. peft needs
transformers, so every install has it; together they are about 1.2 s of each start on a 2-core CPU, before the
first step of a run that uses neither. While torchmetrics itself is being imported, and only then, those two
requirements read as absent to it; every other module (peft, lm_eval, the user's code) imports them as usual.
Set LLMTRAIN_LEAN_IMPORTS=0 where a callback needs torchmetrics' BERTScore or audio metrics.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys

SKIPPED = ("transformers", "scipy")  # the distributions torchmetrics' __init__ would import


def _skipped(requirement: str | None) -> bool:
    return re.split(r"[<>=!~\\[;. ]", requirement or "")[0] in SKIPPED


class _Absent:
    """lightning_utilities' availability checks (RequirementCache and package_available, what torchmetrics asks)
    answer that SKIPPED are not installed while this is active; outside it they answer as before."""

    active = False

    def __enter__(self):
        import lightning_utilities.core.imports as checks

        self.checks, self.real_check = checks, checks.RequirementCache._check_available
        self.real_available = real_available = checks.package_available

        def check(cache) -> None:
            if _Absent.active and (_skipped(cache.requirement) or _skipped(cache.module)):
                cache.available, cache.message = False, "not loaded into torchmetrics (llmtrain.lean_imports)"
            else:
                self.real_check(cache)

        def package_available(name: str) -> bool:  # torchmetrics keeps this one: it asks the real one later
            return False if _Absent.active and _skipped(name) else real_available(name)

        checks.RequirementCache._check_available = check
        checks.package_available = package_available
        _Absent.active = True
        return self

    def __exit__(self, *exc) -> None:
        _Absent.active = False
        self.checks.RequirementCache._check_available = self.real_check
        self.checks.package_available = self.real_available


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        with _Absent():
            self.real.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds torchmetrics the usual way, once, and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != "torchmetrics":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Wrap torchmetrics' first import, unless it already happened or LLMTRAIN_LEAN_IMPORTS=0."""
    if os.environ.get("LLMTRAIN_LEAN_IMPORTS", "1") != "0" and "torchmetrics" not in sys.modules:
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
