#!/usr/bin/env python3
"""A mutation round: break the code in small, plausible ways, one at a time, and see which tests notice.

Each entry of `scripts/mutants.yaml` names a file, a snippet of it that occurs exactly once, its replacement
(one plausible mistake: `<` for `<=`, a sign, a default, a dropped call) and a line saying what the mistake is.
For each one this script copies the working tree (the files git tracks or would track) into a temporary folder
once, applies the mistake there, runs the fast tests that cover the file (pytest -x -m "not slow"; the copy's
llmtrain is imported, not the installed one), puts the file back and records:

- caught: a test failed or errored (or the run timed out);
- missed: the tests passed;
- stale: the snippet no longer occurs exactly once (or the entry is otherwise broken): fix the entry.

With --slow, each mutation the fast tier missed runs again against the slow tests of the same files: together
the two tiers are the whole suite. Before the first mutation the covering tests run once unmutated; a test that
fails there is left out of every mutation's run (and listed), so that it cannot catch anything by itself.

The tests that cover a file: the entry's `tests`, else its module's `tests`, else the mirrored test file
(llmtrain/<folder>/<name>.py -> tests/<folder>/test_<name>.py) followed by every test file that imports the
module or names it in a string (a monkeypatch target).

    python scripts/mutants.py                     # every entry, fast tier
    python scripts/mutants.py --slow --jobs 2     # then the slow tests for the misses; two copies at once
    python scripts/mutants.py --only training/optim --only 'warmup'
    python scripts/mutants.py --check             # only check that the list matches the code
"""

from __future__ import annotations

import argparse
import ast
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIST = Path("scripts") / "mutants.yaml"
DEFAULT_REPORT = Path("outputs") / "mutants.md"
PACKAGE = "llmtrain"
FAST, SLOW = "not slow", "slow"  # the two tiers, as pytest -m expressions
ENTRY_KEYS = {"original", "replacement", "description", "tests"}
MODULE_KEYS = {"tests", "mutations"}


class ListError(ValueError):
    """The mutation list cannot be read: its structure, not one entry's snippet."""


@dataclass(frozen=True)
class Mutation:
    file: str  # relative to the repository root, e.g. llmtrain/training/optim.py
    index: int  # 1-based, within its file's entries
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]  # the covering test files, relative to the root

    @property
    def name(self) -> str:
        return f"{self.file}#{self.index}"


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | missed | stale
    tier: str = ""  # fast | slow: the tier that caught it
    seconds: float = 0.0
    detail: str = ""  # the first failing test, why it is stale, ...


@dataclass
class Round:
    outcomes: list[Outcome] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # tests that fail without a mutation
    slow: bool = False
    seconds: float = 0.0
    jobs: int = 1


# ---- the list ----

def load_mutations(path: Path, root: Path = ROOT) -> list[Mutation]:
    """The entries of a mutation list, in file order, with their covering tests resolved."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ListError(f"{path}: expected a mapping of module file -> {{tests, mutations}}")
    found: list[Mutation] = []
    for file, module in data.items():
        if not isinstance(module, dict) or set(module) - MODULE_KEYS or "mutations" not in module:
            raise ListError(f"{path}: {file}: expected the keys 'mutations' (a list) and optionally 'tests'")
        module_tests = _test_list(module.get("tests"), f"{path}: {file}: tests")
        if not module_tests and any(isinstance(e, dict) and not e.get("tests") for e in module["mutations"] or []):
            module_tests = covering_tests(file, root)
        for index, entry in enumerate(module["mutations"] or [], 1):
            where = f"{path}: {file}#{index}"
            if not isinstance(entry, dict):
                raise ListError(f"{where}: expected a mapping with original, replacement, description")
            unknown, missing = set(entry) - ENTRY_KEYS, ENTRY_KEYS - {"tests"} - set(entry)
            if unknown or missing:
                raise ListError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
            if not all(isinstance(entry[k], str) for k in ("original", "replacement", "description")):
                raise ListError(f"{where}: original, replacement and description must be strings")
            tests = _test_list(entry.get("tests"), f"{where}: tests") or module_tests
            found.append(Mutation(file, index, entry["original"], entry["replacement"],
                                  " ".join(entry["description"].split()), tests))
    return found


def _test_list(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ListError(f"{where}: expected a list of test files")
    return tuple(value)


def covering_tests(file: str, root: Path = ROOT) -> tuple[str, ...]:
    """The mirrored test file of `file` (if there is one), then every other test file that imports its module or
    names it in a string: those of the mirrored folder first (with pytest -x they run first), then by path."""
    path = Path(file)
    module = ".".join(path.with_suffix("").parts)
    mirrored = Path("tests", *path.parts[1:-1], f"test_{path.stem}.py")
    found = [mirrored.as_posix()] if (root / mirrored).is_file() else []
    own_folder_first = lambda test: (test.parent != root / mirrored.parent, test)  # noqa: E731
    for test in sorted((root / "tests").rglob("test_*.py"), key=own_folder_first):
        relative = test.relative_to(root).as_posix()
        if relative not in found and module in _references(test):
            found.append(relative)
    return tuple(found)


@cache
def _references(test: Path) -> set[str]:
    return referenced_modules(test.read_text())


def referenced_modules(source: str) -> set[str]:
    """The llmtrain modules that a test file imports (anywhere in it, `from a.b import c` counting a.b.c too) or
    names in a string such as a monkeypatch target ("llmtrain.x.y.name" counts llmtrain.x.y)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGE + "."):
            dotted = node.value.split()[0]
            names.update(".".join(dotted.split(".")[:n]) for n in range(2, dotted.count(".") + 2))
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def problems(mutation: Mutation, root: Path = ROOT) -> list[str]:
    """Why an entry cannot run against this tree (empty when it can): what makes it stale."""
    path = root / mutation.file
    if not path.is_file():
        return [f"{mutation.file} does not exist"]
    text = path.read_text()
    found = []
    count = text.count(mutation.original)
    if count != 1:
        found.append(f"its original occurs {count} times in {mutation.file}, not once")
    elif mutation.original == mutation.replacement:
        found.append("its replacement is its original")
    else:
        try:
            compile(text.replace(mutation.original, mutation.replacement), mutation.file, "exec")
        except SyntaxError as e:
            found.append(f"the mutated file does not compile ({e.msg}, line {e.lineno})")
    if not mutation.tests:
        found.append(f"no test file covers {mutation.file}: give the entry (or its module) `tests`")
    found += [f"its test file {t} does not exist" for t in mutation.tests if not (root / t).is_file()]
    return found


def select(mutations: list[Mutation], patterns: list[str]) -> list[Mutation]:
    """The entries whose name (file#index) or description matches one of the regular expressions (all without)."""
    if not patterns:
        return mutations
    return [m for m in mutations if any(re.search(p, m.name) or re.search(p, m.description) for p in patterns)]


# ---- running the tests in a copy ----

def tree_files(root: Path) -> list[str]:
    """The working tree's files that git tracks or would track (untracked, not ignored), as they are now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted(f for f in set(out.split("\0")) if f and (root / f).is_file())


def make_copy(root: Path, dest: Path, files: list[str]) -> Path:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    imported = subprocess.run([sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"], cwd=dest,
                              env=test_env(dest), capture_output=True, text=True)
    where = Path(imported.stdout.strip() or "?").resolve()
    if imported.returncode != 0 or not where.is_relative_to(dest.resolve()):
        raise RuntimeError(f"the copy in {dest} imports {PACKAGE} from {where}, not from itself: {imported.stderr}")
    return dest


def test_env(copy: Path) -> dict[str, str]:
    """The copy first on the path (also for the processes the slow tests start), and no bytecode written: a
    mutated file and its original can have the same size and modification second."""
    path = os.pathsep.join(p for p in (str(copy), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


@contextmanager
def mutated(copy: Path, mutation: Mutation) -> Iterator[None]:
    path = copy / mutation.file
    text = path.read_text()
    path.write_text(text.replace(mutation.original, mutation.replacement, 1))
    try:
        yield
    finally:
        path.write_text(text)


@dataclass
class TestRun:
    passed: bool
    seconds: float
    failures: list[str]  # node ids of failed or errored tests (or collection errors)
    note: str = ""  # timeout, no tests


def run_tests(copy: Path, files: tuple[str, ...], tier: str, timeout: float, deselect: list[str],
              stop_first: bool = True) -> TestRun:
    """pytest on `files` of one tier in the copy: passed means every selected test passed (or none was selected)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", tier, "-p", "no:cacheprovider", "-rfE",
               *(["-x"] if stop_first else []), *files]
    command += [arg for node in deselect if node.split("::")[0] in files for arg in ("--deselect", node)]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=copy, env=test_env(copy), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest and whatever processes its tests started
        process.communicate()
        return TestRun(False, time.monotonic() - start, [], f"timed out after {timeout:.0f} s")
    seconds = time.monotonic() - start
    failures = [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
                if line.startswith(("FAILED ", "ERROR "))]
    if process.returncode in (0, 5):  # 5: nothing selected (e.g. no slow test in these files)
        return TestRun(True, seconds, [], "no tests" if process.returncode == 5 else "")
    if process.returncode in (1, 2):  # tests failed; interrupted (a collection error, -x)
        return TestRun(False, seconds, failures or [output.strip().splitlines()[-1] if output.strip() else "?"])
    raise RuntimeError(f"pytest exited with {process.returncode} on {' '.join(files)}:\n{output[-3000:]}")


def baseline(copy: Path, mutations: list[Mutation], tier: str, timeout: float) -> list[str]:
    """The tests of this tier that fail with no mutation applied, over every file the mutations run."""
    files = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    if not files:
        return []
    print(f"without a mutation first: the {tier!r} tests of {len(files)} files", flush=True)
    result = run_tests(copy, files, tier, timeout * 4, [], stop_first=False)
    if result.note.startswith("timed out"):
        raise RuntimeError(f"the unmutated {tier!r} tests {result.note}")
    if any("::" not in f for f in result.failures):
        raise RuntimeError(f"the unmutated {tier!r} tests do not even collect: {result.failures}")
    return result.failures


# ---- the round ----

class Copies:
    """One copy of the tree per job, handed out to one mutation at a time."""

    def __init__(self, copies: list[Path]) -> None:
        self._free: queue.Queue[Path] = queue.Queue()
        for c in copies:
            self._free.put(c)

    @contextmanager
    def one(self) -> Iterator[Path]:
        copy = self._free.get()
        try:
            yield copy
        finally:
            self._free.put(copy)


def run_mutation(copies: Copies, mutation: Mutation, tier: str, timeout: float, deselect: list[str]) -> Outcome:
    with copies.one() as copy, mutated(copy, mutation):
        result = run_tests(copy, mutation.tests, tier, timeout, deselect)
    kind = "fast" if tier == FAST else "slow"
    if result.passed:
        return Outcome(mutation, "missed", "", result.seconds, result.note)
    return Outcome(mutation, "caught", kind, result.seconds, result.note or ", ".join(result.failures[:1]))


def print_line(outcome: Outcome, done: int, total: int, tier: str) -> None:
    by = outcome.tier or ("fast" if tier == FAST else "slow")
    detail = f" ({outcome.detail})" if outcome.detail else ""
    print(f"[{done:>{len(str(total))}}/{total}] {outcome.status:<6} {by:<4} {outcome.seconds:6.1f} s  "
          f"{outcome.mutation.name}  {outcome.mutation.description}{detail}", flush=True)


def run_tier(copies: Copies, mutations: list[Mutation], tier: str, timeout: float, deselect: list[str],
             jobs: int) -> dict[str, Outcome]:
    lock, done, out = threading.Lock(), [0], {}

    def one(mutation: Mutation) -> None:
        outcome = run_mutation(copies, mutation, tier, timeout, deselect)
        with lock:
            done[0] += 1
            out[mutation.name] = outcome
            print_line(outcome, done[0], len(mutations), tier)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, m) for m in mutations]:
            future.result()
    return out


def run_round(mutations: list[Mutation], root: Path, slow: bool, jobs: int, timeout: float,
              check_baseline: bool = True) -> Round:
    start = time.monotonic()
    result = Round(slow=slow, jobs=jobs)
    stale = {m.name: p for m in mutations if (p := problems(m, root))}
    for name, found in stale.items():
        print(f"stale  {name}: {'; '.join(found)}", file=sys.stderr, flush=True)
    runnable = [m for m in mutations if m.name not in stale]
    outcomes = {name: Outcome(m, "stale", detail="; ".join(stale[name])) for m in mutations
                if (name := m.name) in stale}
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        files = tree_files(root)
        copies = [make_copy(root, Path(tmp) / str(i), files) for i in range(max(1, min(jobs, len(runnable))))]
        pool = Copies(copies)
        left_out = baseline(copies[0], runnable, FAST, timeout) if check_baseline and runnable else []
        for node in left_out:
            print(f"left out (fails without a mutation): {node}", file=sys.stderr, flush=True)
        outcomes |= run_tier(pool, runnable, FAST, timeout, left_out, jobs)
        missed = [m for m in runnable if outcomes[m.name].status == "missed"]
        if slow and missed:
            print(f"--slow: the {len(missed)} misses against the slow tests of the same files", flush=True)
            slow_left_out = baseline(copies[0], missed, SLOW, timeout) if check_baseline else []
            for node in slow_left_out:
                print(f"left out (fails without a mutation): {node}", file=sys.stderr, flush=True)
            left_out += slow_left_out
            again = run_tier(pool, missed, SLOW, timeout, slow_left_out, jobs)
            for name, outcome in again.items():
                outcome.seconds += outcomes[name].seconds
                outcomes[name] = outcome
    result.outcomes = [outcomes[m.name] for m in mutations]
    result.left_out = left_out
    result.seconds = time.monotonic() - start
    return result


# ---- figures and the report ----

def percent(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}%" if total else "-"


def figures(result: Round) -> dict[str, int]:
    ran = [o for o in result.outcomes if o.status != "stale"]
    return {"ran": len(ran), "fast": sum(o.tier == "fast" for o in ran),
            "whole": sum(o.status == "caught" for o in ran), "stale": len(result.outcomes) - len(ran)}


def summary_lines(result: Round) -> list[str]:
    f = figures(result)
    lines = [f"caught by the fast tier: {f['fast']} of {f['ran']} ({percent(f['fast'], f['ran'])})"]
    if result.slow:
        lines.append(f"caught by the whole suite: {f['whole']} of {f['ran']} ({percent(f['whole'], f['ran'])})")
    else:
        lines.append("caught by the whole suite: not measured (run with --slow)")
    lines.append(f"stale entries: {f['stale']}" if f["stale"] else "stale entries: none")
    return lines


def report(result: Round, command: str) -> str:
    """The round as Markdown: the figures, a table per module, the misses and stale entries."""
    f = figures(result)
    modules = list(dict.fromkeys(o.mutation.file for o in result.outcomes))
    minutes = result.seconds / 60
    out = [f"{f['ran']} mutations of {len(modules)} modules, `{command}`, {minutes:.0f} min with {result.jobs} "
           f"job{'s' if result.jobs > 1 else ''}.", ""]
    out += [f"- {line}" for line in summary_lines(result)] + [""]
    out += ["| module | mutations | caught, fast tier | caught, whole suite |", "|---|---:|---:|---:|"]
    for module in modules:
        ran = [o for o in result.outcomes if o.mutation.file == module and o.status != "stale"]
        fast = sum(o.tier == "fast" for o in ran)
        whole = sum(o.status == "caught" for o in ran) if result.slow else None
        out.append(f"| `{module}` | {len(ran)} | {fast} | {'-' if whole is None else whole} |")
    misses = [o for o in result.outcomes if o.status == "missed"]
    out += ["", "Missed" + (" by the whole suite:" if result.slow else " by the fast tier:")]
    out += [f"- `{o.mutation.name}`: {o.mutation.description}" for o in misses] or ["- none"]
    slow_only = [o for o in result.outcomes if o.tier == "slow"]
    if slow_only:
        out += ["", "Caught by the slow tests only:"]
        out += [f"- `{o.mutation.name}`: {o.mutation.description} ({o.detail})" for o in slow_only]
    stale = [o for o in result.outcomes if o.status == "stale"]
    if stale:
        out += ["", "Stale entries (fix them in scripts/mutants.yaml):"]
        out += [f"- `{o.mutation.name}`: {o.detail}" for o in stale]
    if result.left_out:
        out += ["", "Tests left out because they fail without a mutation:"]
        out += [f"- `{node}`" for node in result.left_out]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", type=Path, default=DEFAULT_LIST, help=f"the mutation list (default {DEFAULT_LIST})")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="run the entries whose file#index or description matches this regular expression "
                             "(repeatable)")
    parser.add_argument("--slow", action="store_true",
                        help="run what the fast tier missed against the slow tests of the same files too")
    parser.add_argument("--jobs", type=int, default=1, help="mutations at once, each in its own copy (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT,
                        help=f"where the Markdown report goes (default {DEFAULT_REPORT})")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run that finds tests failing already")
    parser.add_argument("--check", action="store_true", help="only check that every entry matches the code")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mutations = select(load_mutations(ROOT / args.list), args.only)
    except (ListError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not mutations:
        print(f"error: no entry of {args.list} matches {args.only}", file=sys.stderr)
        return 2
    if args.check:
        stale = {m.name: p for m in mutations if (p := problems(m))}
        for name, found in stale.items():
            print(f"stale  {name}: {'; '.join(found)}")
        print(f"{len(mutations) - len(stale)} of {len(mutations)} entries match the code")
        return 1 if stale else 0
    result = run_round(mutations, ROOT, args.slow, max(1, args.jobs), args.timeout, not args.no_baseline)
    command = " ".join(["python scripts/mutants.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(result, command)
    target = ROOT / args.report
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print("\n".join(summary_lines(result)))
    misses = [o.mutation for o in result.outcomes if o.status == "missed"]
    for m in misses:
        print(f"  missed {m.name}  {m.description}")
    print(f"{result.seconds / 60:.1f} min; report: {args.report}")
    return 1 if any(o.status == "stale" for o in result.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
