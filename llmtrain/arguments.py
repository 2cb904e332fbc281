"""`key=value` arguments for the entry points other than training (generate, export, loss_tokens), read against a
dataclass schema with OmegaConf: the syntax of training's overrides, one line for every mistake.

A value is read as OmegaConf reads a dotlist (YAML): `max_new_tokens=40`, `top_p=0.9`, `raw=true`, `top_k=null`,
`tasks=[a,b]`, quotes for text that would read otherwise (`prompt='null'`). A text field takes unquoted text
exactly as typed, so that a prompt such as `Q: why?`, `yes` or `${HOME}` stays what it says (and `prompt=` is the
empty text). MISSING (`???`) marks a required key.

`--help` prints the entry point's module docstring (its usage) and every key with its type, default and comment:
the comment on the field's line in the schema, and comment lines right below it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtrain.errors import UserError

T = TypeVar("T")
NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false"}
ITEMS = {str: "text", int: "integers", float: "numbers", bool: "true/false values"}


def parse(schema: type[T], argv: Sequence[str]) -> T:
    """['key=value', ...] -> an instance of the dataclass `schema`; every problem in one UserError, `--help` prints
    the usage and exits."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(schema))
        sys.exit(0)
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    cfg = OmegaConf.structured(schema)
    problems, values = [], []
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            problems.append(f"{arg!r} is not key=value")
        elif key.startswith("-"):
            problems.append(f"{arg!r}: write {key.lstrip('-')}={raw}, without dashes")
        elif key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            problems.append(f"unknown key {key!r}{f' (did you mean {near[0]}?)' if near else ''}")
        else:
            try:
                cfg = OmegaConf.merge(cfg, {key: read_value(raw, hints[key])})
            except (ValueError, yaml.YAMLError, OmegaConfBaseException):
                values.append(f"{key}={raw}: expected {type_name(hints[key])}")
    if problems:  # an argument that names no key: say once which keys there are
        problems.append(f"the keys are {', '.join(known)}")
    problems += values
    problems += [f"{key} is not set: give {key}=..., {comments(schema).get(key) or 'see --help'}"
                 for key in known if OmegaConf.is_missing(cfg, key)]
    if problems:
        raise UserError("; ".join(problems))
    # not resolved: a text holding `${...}` is text, not an interpolation (the schemas are flat: no nested dataclass)
    return schema(**OmegaConf.to_container(cfg, resolve=False))


def read_value(raw: str, kind: Any) -> Any:
    """One value as the field's type reads it: text as typed (null = not set, quotes taken off), anything else as
    YAML through OmegaConf's dotlist; OmegaConf's merge then checks it against the type."""
    base, optional = unwrap(kind)
    if base is str and raw != "null":
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        try:  # a quoted text loses its quotes; a text that only starts and ends with one is text as typed
            value = read_yaml(raw) if quoted else raw
        except yaml.YAMLError:
            value = raw
        return value if isinstance(value, str) else raw
    value = read_yaml(raw)
    if value is None and not optional:
        raise ValueError("null for a field that needs a value")
    if isinstance(value, str) and "${" in value and base is not str:  # no interpolation: it would stay unread
        raise ValueError("an interpolation")
    if base is bool and not isinstance(value, bool) and value not in (0, 1):  # OmegaConf would take 2 for true
        raise ValueError("not a truth value")
    return value


def read_yaml(raw: str) -> Any:
    """The value OmegaConf's dotlist makes of `key=raw`, as plain Python."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]


def unwrap(kind: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); X -> (X, False). (OmegaConf's fields hold one type, or one type or None.)"""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def type_name(kind: Any) -> str:
    """A field's type in words: 'an integer', 'a number or null', 'a list like [a, b] of text'."""
    base, optional = unwrap(kind)
    if typing.get_origin(base) is list:
        item = (typing.get_args(base) or (Any,))[0]
        name = "a list like [a,b]" + (f" of {ITEMS[item]}" if item in ITEMS else "")
    else:
        name = NAMES.get(base, getattr(base, "__name__", str(base)))
    return name + (" or null" if optional else "")


def comments(schema: type) -> dict[str, str]:
    """Each field's comment in the schema's source: the comment on its line(s), and comment lines right below."""
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):  # no source (e.g. a class made at run time): the help shows types and defaults
        return {}
    lines = source.splitlines()
    found = {t.start[0]: t.string.lstrip("#").strip()
             for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            parts = [found[i] for i in range(node.lineno, node.end_lineno + 1) if i in found]
            below = node.end_lineno + 1
            while below in found and lines[below - 1].lstrip().startswith("#"):
                parts.append(found[below])
                below += 1
            out[node.target.id] = " ".join(parts)
    return out


def show(value: Any) -> str:
    """A default as it would be typed: null, true, [a, b], '' for the empty text."""
    if value == "":
        return "''"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def usage(schema: type) -> str:
    """The entry point's docstring, then one line a key: name, type, default (or `required`), comment."""
    doc = (sys.modules[schema.__module__].__doc__ or "").strip()
    notes, hints, rows = comments(schema), typing.get_type_hints(schema), []
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            default = "required" if f.default == MISSING else f"default {show(f.default)}"
        else:
            default = f"default {show(f.default_factory())}"
        rows.append((f.name, f"{type_name(hints[f.name])}, {default}", notes.get(f.name, "")))
    width = [max(len(r[i]) for r in rows) for i in (0, 1)]
    indent = " " * (width[0] + width[1] + 6)
    table = "\n".join(textwrap.fill(f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}", width=max(116, len(indent) + 40),
                                     subsequent_indent=indent, break_on_hyphens=False) for a, b, c in rows)
    return (f"{doc}\n\nkeys (key=value; values as in training's overrides: null, true/false, [a,b], 'quoted'; "
            f"text is taken as typed):\n{table}")
