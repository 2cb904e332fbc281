"""lm-evaluation-harness tasks: finding them (the ones shipped in llmtrain/assets/tasks, a user's folder, lm_eval's
own), loading them offline where their data is local, running them on a model, and its results as a table.

A task YAML of a folder may name local files by paths relative to itself (`dataset_path: json` with
`dataset_kwargs: {data_files: {test: ../data/x.jsonl.gz}}`): they are resolved against the YAML's folder, not the
working directory, so the shipped tasks and a user's folder work from anywhere. lm_eval's own task index (thousands of
YAMLs, ~10 s to read) is read only when a task is not found in these folders. A task whose data is on the Hugging
Face Hub and cannot be fetched is one UserError naming it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from lm_eval import evaluator
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import handle_non_serializable, make_table

from llmtrain.errors import UserError


def shipped_dir() -> Path:
    return Path(str(resources.files("llmtrain.assets").joinpath("tasks")))


def shipped_tasks() -> list[str]:
    """The names of the tasks shipped with llmtrain (each YAML is named after its task)."""
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def load_tasks(names: list[str], tasks_dir: str | None = None, key: str = "tasks") -> tuple[list, TaskManager]:
    """(the lm_eval Tasks and Groups that names name, their datasets loaded; the TaskManager that found them)."""
    if not names:
        raise UserError(f"{key} is empty: give {key}=[{','.join(shipped_tasks())}] or other lm_eval task names")
    folders = [shipped_dir()]
    if tasks_dir is not None:
        folder = Path(tasks_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"tasks_dir={tasks_dir}: no such directory: give the folder that holds your task YAMLs")
        folders.append(folder.resolve())
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    local = set(manager.all_tasks)
    if not set(names) <= local:  # lm_eval's own tasks: read its index too
        manager = TaskManager(include_path=[str(f) for f in folders])
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        ours = f"llmtrain ({', '.join(shipped_tasks())})" + (" or of tasks_dir" if tasks_dir else "")
        raise UserError(f"{key}: {', '.join(unknown)} {'is not a task' if len(unknown) == 1 else 'are not tasks'} "
                        f"of lm_eval, nor of {ours}: check the spelling (lm_eval ls tasks lists its own)")
    items: list = []
    for name in names:
        spec = _resolved_spec(manager, name, folders)
        try:
            loaded = manager.load([spec])
        except Exception as e:  # the dataset could not be read: the Hub offline, a missing file, ...
            raise UserError(_unreadable(name, manager, e)) from e
        group = loaded.get("groups", {}).get(name)
        items += [group] if group is not None else list(loaded["tasks"].values())
    return items, manager


def _resolved_spec(manager: TaskManager, name: str, folders: list[Path]) -> str | dict:
    """A task of one of our folders with its relative data_files made absolute (against its YAML's folder); any
    other name as it is."""
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None or getattr(entry.kind, "name", "") != "TASK" or \
            not any(Path(path).resolve().is_relative_to(f) for f in folders):
        return name
    config = load_yaml(path, resolve_func=True)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return name
    here = Path(path).resolve().parent

    def absolute(value):
        if isinstance(value, str):
            return value if "://" in value or Path(value).is_absolute() else str(here / value)
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return {k: absolute(v) for k, v in value.items()} if isinstance(value, dict) else value

    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": absolute(files)}
    config.pop("include", None)
    return config


def _unreadable(name: str, manager: TaskManager, error: Exception) -> str:
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    dataset = None
    if path is not None:
        try:
            dataset = load_yaml(path, resolve_func=False).get("dataset_path")
        except Exception:  # noqa: BLE001 - only for the message
            dataset = None
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    cause = f"{type(error).__name__}{f': {first}' if first else ''}"
    if dataset and dataset not in ("json", "csv", "parquet", "text", "arrow"):
        return (f"task {name} reads the Hugging Face Hub dataset {dataset}, which could not be loaded ({cause}): run "
                f"where the network reaches huggingface.co (HF_DATASETS_OFFLINE unset), or choose a local task "
                f"({', '.join(shipped_tasks())}, or your own with tasks_dir=)")
    return f"task {name}: its data could not be loaded ({cause}): check the files its YAML names"


def run_tasks(lm: LM, loaded: tuple[list, TaskManager], limit: int | float | None = None,
              bootstrap_iters: int = 1000, seed: int = 1234, log_samples: bool = False,
              apply_chat_template: bool = False, system_instruction: str | None = None) -> dict:
    """lm_eval's results dict (results, configs, versions, n-samples, config, ...) for what load_tasks loaded; with
    apply_chat_template, each request rendered by the model's chat template (lm.apply_chat_template)."""
    items, manager = loaded
    return evaluator.simple_evaluate(model=lm, tasks=items, task_manager=manager, limit=limit, log_samples=log_samples,
                                     bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                                     torch_random_seed=seed, fewshot_random_seed=seed,
                                     apply_chat_template=apply_chat_template, system_instruction=system_instruction)


def results_json(results: dict) -> str:
    """The results as lm_eval's command line writes them (its own encoder for numpy values and functions)."""
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def results_table(results: dict) -> str:
    """lm_eval's Markdown table of the scores (and of the groups', where there are groups)."""
    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")

