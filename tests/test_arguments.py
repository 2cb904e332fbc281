"""llmtrain.arguments: key=value read against a dataclass schema, typed as training's overrides are; every mistake
one line (in this process, and through the real entry points), `--help` made from the schema."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, subprocess_env
from omegaconf import MISSING

from llmtrain.arguments import comments, parse
from llmtrain.errors import UserError


@dataclass
class Schema:
    ckpt: str = MISSING  # the model to read
    steps: int = 10  # how many
    rate: float = 0.5
    greedy: bool = False  # pick the likeliest token
    # (and never sample)
    top_k: int | None = 50  # null = off
    name: str | None = None
    text: str = ""
    tasks: list[str] = field(default_factory=lambda: ["a"])  # tasks to run
    sizes: list[int] = field(default_factory=list)


def test_values_are_typed_as_the_schema_says():
    args = parse(Schema, ["ckpt=run", "steps=3", "rate=1", "greedy=true", "top_k=null", "name=x", "tasks=[b,c]",
                          "sizes=[1, 2]"])
    assert args == Schema(ckpt="run", steps=3, rate=1.0, greedy=True, top_k=None, name="x", tasks=["b", "c"],
                          sizes=[1, 2])
    assert isinstance(args.rate, float) and isinstance(args.steps, int)
    assert parse(Schema, ["ckpt=run"]) == Schema(ckpt="run")  # the defaults
    assert parse(Schema, ["ckpt=run", "greedy=no", "top_k=7", "name=null"]).greedy is False


def test_text_is_taken_as_typed_and_quotes_make_text_of_anything():
    args = parse(Schema, ["ckpt=Q: why? # not a comment", "name=yes", "text=${HOME} costs 1e3"])
    assert (args.ckpt, args.name, args.text) == ("Q: why? # not a comment", "yes", "${HOME} costs 1e3")
    args = parse(Schema, ["ckpt='null'", "name=\"true\"", "text="])
    assert (args.ckpt, args.name, args.text) == ("null", "true", "")
    assert parse(Schema, ["ckpt=a=b"]).ckpt == "a=b"  # the first = splits
    assert parse(Schema, ['ckpt="Hi," she said, "bye"']).ckpt == '"Hi," she said, "bye"'  # not one quoted text


@pytest.mark.parametrize("argv, message", [
    (["ckpt=x", "steps=abc"], "steps=abc: expected an integer"),
    (["ckpt=x", "steps=2.5"], "steps=2.5: expected an integer"),
    (["ckpt=x", "rate=fast"], "rate=fast: expected a number"),
    (["ckpt=x", "greedy=2"], "greedy=2: expected true or false"),
    (["ckpt=x", "top_k=many"], "top_k=many: expected an integer or null"),
    (["ckpt=x", "steps=null"], "steps=null: expected an integer"),
    (["ckpt=x", "text=null"], "text=null: expected text"),
    (["ckpt=x", "tasks=a"], "tasks=a: expected a list like [a,b] of text"),
    (["ckpt=x", "sizes=[a]"], "sizes=[a]: expected a list like [a,b] of integers"),
    (["ckpt=x", "steps=${x}"], "steps=${x}: expected an integer"),
    (["ckpt=x", "stpes=3"], "unknown key 'stpes' (did you mean steps?); the keys are ckpt, steps, rate, greedy, "
                            "top_k, name, text, tasks, sizes"),
    (["ckpt=x", "run"], "'run' is not key=value; the keys are ckpt, steps"),
    (["ckpt=x", "--steps=3"], "'--steps=3': write steps=3, without dashes"),
    (["steps=3"], "ckpt is not set: give ckpt=..., the model to read"),
    (["ckpt=???"], "ckpt is not set: give ckpt=..."),
])
def test_each_mistake_is_one_line_that_names_the_key_and_the_fix(argv, message):
    with pytest.raises(UserError) as e:
        parse(Schema, argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as e:
        parse(Schema, ["nope=1", "steps=x", "rate=y"])
    assert str(e.value) == ("unknown key 'nope'; the keys are ckpt, steps, rate, greedy, top_k, name, text, tasks, "
                            "sizes; steps=x: expected an integer; rate=y: expected a number; ckpt is not set: give "
                            "ckpt=..., the model to read")


def test_comments_are_the_fields_own_and_the_lines_below():
    assert comments(Schema) == {"ckpt": "the model to read", "steps": "how many", "rate": "",
                                "greedy": "pick the likeliest token (and never sample)", "top_k": "null = off",
                                "name": "", "text": "", "tasks": "tasks to run", "sizes": ""}


def test_help_prints_the_usage_and_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse(Schema, ["steps=oops", "--help"])  # help wins over mistakes
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(__doc__.strip())
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert list(rows) == [f.name for f in dataclasses.fields(Schema)]
    assert rows["ckpt"].split() == ["ckpt", "text,", "required", "the", "model", "to", "read"]
    for key, words in {"steps": "an integer, default 10", "rate": "a number, default 0.5",
                       "greedy": "true or false, default false", "top_k": "an integer or null, default 50",
                       "name": "text or null, default null", "text": "text, default ''",
                       "tasks": "a list like [a,b] of text, default [a]", "sizes": "default []"}.items():
        assert words in rows[key], rows[key]
    assert rows["greedy"].endswith("pick the likeliest token (and never sample)")


@pytest.mark.parametrize("module", ["generate", "export", "loss_tokens"])
def test_each_entry_point_lists_its_schema_in_its_help(module, capsys):
    import importlib

    entry = importlib.import_module(f"llmtrain.{module}")
    schema = next(v for k, v in vars(entry).items() if k.endswith("Args") and dataclasses.is_dataclass(v))
    with pytest.raises(SystemExit) as e:
        entry.main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(entry.__doc__.strip())
    listed = [line.split()[0] for line in out.split("\nkeys (", 1)[1].splitlines()[1:] if line[2:3] != " "]
    assert listed == [f.name for f in dataclasses.fields(schema)]
    for name, note in comments(schema).items():
        assert " ".join(note.split()[:4]) in " ".join(out.split()), name


@pytest.mark.slow  # a process of each command
def test_the_real_commands_answer_a_mistake_in_one_line():
    """A wrong type, an unknown key, a missing value: exit 2, one line on stderr, no traceback."""
    env = subprocess_env()
    env.pop("LLMTRAIN_DEBUG", None)
    commands = {
        "loss_tokens": (["record=abc"], "error: record=abc: expected an integer or null\n"),
        "generate": (["ckpt_path=x", "prompt=hi", "tempreature=0"], "error: unknown key 'tempreature' (did you mean "
                                                                     "temperature?); the keys are ckpt_path, "),
        "export": (["source=run"], "error: out_dir is not set: give out_dir=..., the folder to write"),
    }

    def run(module):
        return subprocess.run([sys.executable, "-m", f"llmtrain.{module}", *commands[module][0]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:  # each process spends its second or two importing torch
        results = dict(zip(commands, pool.map(run, commands)))
    for module, result in results.items():
        assert result.returncode == 2, (module, result.stderr)
        assert result.stderr.startswith(commands[module][1]) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
