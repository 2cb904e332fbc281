"""The package's shape: no import circles, imports point down the layers, the model folder imports torch alone,
entry points start light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env

PACKAGE = ROOT / "llmtrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The llmtrain modules that a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llmtrain")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmtrain"):
            for alias in node.names:  # `from llmtrain.data import tokens` imports the module llmtrain.data.tokens
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts]
    graph = {module_name(p): imports_of(p) for p in files}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and "llmtrain.data.tokens" in graph  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, lowest first: a module may import modules of its own layer and of the layers below it (and errors,
# which every layer raises, and files, which writes files whole). Data flows one way: config -> data -> model and
# stage -> LightningModule -> Trainer -> outputs. The entry points (python -m llmtrain, llmtrain.generate, ...) sit
# on top; nothing imports the command line.
LAYERS = ("model", "data", "interop", "stages", "training", "run", "entry")
SHARED = {"llmtrain", "llmtrain.errors", "llmtrain.files"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "entry"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers (or at the command line), as 'importer -> imported'."""
    bad = []
    for module, deps in sorted(graph.items()):
        if module in SHARED:
            continue
        rank = LAYERS.index(layer_of(module))
        for dep in sorted(deps - SHARED):
            if LAYERS.index(layer_of(dep)) > rank or (dep == "llmtrain.cli" and module != "llmtrain.__main__"):
                bad.append(f"{module} -> {dep}")
    return bad


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert {layer_of(m) for m in graph} >= set(LAYERS)  # every folder was found
    assert layer_violations(graph) == []


def test_the_layer_check_finds_an_import_that_points_up():
    graph = {"llmtrain.model.gpt": {"llmtrain.training.module"}, "llmtrain.data.tokens": {"llmtrain.model.losses"},
             "llmtrain.run.train": {"llmtrain.cli"}, "llmtrain.training.module": {"llmtrain.errors"}}
    assert layer_violations(graph) == ["llmtrain.model.gpt -> llmtrain.training.module",
                                       "llmtrain.run.train -> llmtrain.cli"]


def test_model_files_import_only_torch():
    """The model folder imports torch, the standard library's basics and itself: nothing of training, configs,
    LoRA or the rest of llmtrain."""
    for path in (PACKAGE / "model").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            (n.module if isinstance(n, ast.ImportFrom) else a.name)
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        outside = {m for m in imported if not m.startswith("llmtrain.model") and m.split(".")[0] not in
                   {"torch", "math", "dataclasses", "__future__", "typing", "collections"}}
        assert not outside, (path.name, outside)


def test_no_file_is_over_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_entry_points_do_not_import_lightning_or_peft():
    """The command line checks the config, and generate and export load a model, without Lightning's, peft's or
    transformers' seconds (transformers is not even a dependency); evaluate's --help without lm_eval's."""
    code = ("import sys, llmtrain.cli, llmtrain.generate, llmtrain.export, llmtrain.evaluate; "
            "print(sorted(m for m in ('lightning', 'peft', 'transformers', 'lm_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


LEAN_CHECK = """
import sys
import {module}
from lightning_utilities.core.imports import RequirementCache, package_available
loaded = sorted(m for m in ('transformers', 'scipy') if m in sys.modules)
import peft, torchmetrics  # peft needs transformers: the user's and peft's imports still find it
print(loaded, bool(RequirementCache('transformers')), package_available('transformers'),
      torchmetrics.package_available('transformers'), 'transformers' in sys.modules)
"""


def test_the_recipe_starts_without_transformers_and_scipy():
    """torchmetrics (imported by Lightning) would import transformers and scipy on every start; lean_imports keeps
    them out of the recipe, and only out of torchmetrics: afterwards the availability checks answer as before and
    peft imports transformers. LLMTRAIN_LEAN_IMPORTS=0 brings torchmetrics' imports back."""
    def run(module: str, **env: str) -> str:
        out = subprocess.run([sys.executable, "-c", LEAN_CHECK.format(module=module)], capture_output=True,
                             text=True, cwd=ROOT, timeout=180, env={**subprocess_env(), **env})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run("llmtrain.run.train") == "[] True True True True"
    assert run("llmtrain, torchmetrics", LLMTRAIN_LEAN_IMPORTS="0") == "['scipy', 'transformers'] True True True True"
