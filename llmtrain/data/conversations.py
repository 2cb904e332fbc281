"""Conversations: records of messages, read from the two layouts chat data comes in and checked once.

- OpenAI's: `messages: [{"role": "system"|"user"|"assistant", "content": "..."}, ...]`;
- ShareGPT's: `conversations: [{"from": "system"|"human"|"gpt", "value": "..."}, ...]`, converted on read.

A conversation is an optional system message, then user and assistant turns alternating, starting with the user,
with at least one assistant turn. A record that is not one is a UserError naming the record (its row in the file, or
its split and number) and the field, so that a bad line of a file of thousands is found at once; or, with
data.on_bad_record=skip, is left out and counted (`read_records`). Preference records of messages (DPO's) are read
into a prompt and the two final assistant turns by `read_preference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from llmtrain.errors import UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = {"messages": ("role", "content", None), "conversations": ("from", "value", SHAREGPT_ROLES)}

Message = dict[str, str]
T = TypeVar("T")
ON_BAD_RECORD = ("error", "skip")  # data.on_bad_record: what a malformed record does


def read_conversation(record: dict, where: str) -> list[Message]:
    """The messages of one record ({role, content} each), or a UserError naming the record (`where`) and the field
    at fault."""
    layout = next((name for name in FORMATS if record.get(name) is not None), None)
    if layout is None:
        raise UserError(f"{where} has neither 'messages' (role/content) nor 'conversations' (from/value) "
                        f"(columns: {', '.join(record) or 'none'}): give each record one of them")
    role_key, content_key, names = FORMATS[layout]
    items = record[layout]
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: {layout} is not a non-empty list of messages: fix or drop that record")
    messages = []
    for i, item in enumerate(items):
        field = f"{layout}[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: {field} is not an object with {role_key!r} and {content_key!r}: fix or drop "
                            f"that record")
        role = item.get(role_key)
        role = names.get(role) if names is not None and isinstance(role, str) else role
        if role not in ROLES:
            known = ", ".join(names or ROLES)
            raise UserError(f"{where}: {field}.{role_key}={item.get(role_key)!r} is not a role: use one of {known}")
        content = item.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: {field}.{content_key} is empty: give every message text, or drop that record")
        messages.append({"role": role, "content": content})
    check_order(messages, where, layout, role_key)
    return messages


def check_order(messages: list[Message], where: str, layout: str, role_key: str) -> None:
    """An optional system message first, then user, assistant, user, ... with at least one assistant turn."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UserError(f"{where}: {layout}[{i}].{role_key} is {message['role']!r} where {expected!r} was due "
                            f"(roles out of order: an optional system message, then user and assistant in turn)")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: {layout} has no assistant turn: a record needs at least one answer to train on")


def as_messages(value, role: str, where: str, field: str) -> list[Message]:
    """A preference field as messages: a string is one message of `role`, a message one, a list its messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: {field} is {type(value).__name__}, not text, a message or a list of messages: fix "
                        f"or drop that record")
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def read_preference(record: dict, where: str) -> tuple[list[Message], Message, Message]:
    """(prompt messages, chosen turn, rejected turn) of a preference record whose fields are messages.

    `prompt` (optional) is a conversation up to the answer, or one user message as text; `chosen` and `rejected`
    are the final assistant turn (a message or text), or whole conversations that repeat the prompt, or, without a
    prompt, whole conversations whose shared beginning is the prompt. Both sides must then differ in their last
    message only, an assistant's. A record that is not such is a UserError naming it and the field."""
    prompt = as_messages(record["prompt"], "user", where, "prompt") if record.get("prompt") is not None else []
    sides = {}
    for side in ("chosen", "rejected"):
        messages = as_messages(record[side], "assistant", where, side)
        has_prompt = len(messages) > len(prompt) and messages[: len(prompt)] == prompt
        sides[side] = messages if has_prompt else prompt + messages
    chosen, rejected = sides["chosen"], sides["rejected"]
    shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    for side, messages in sides.items():
        read_conversation({"messages": messages}, f"{where} ({side})")
        if len(messages) != shared + 1 or messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: {side} does not end in one assistant turn after the prompt (chosen and "
                            f"rejected must share every message but their last, an assistant's): fix or drop that "
                            f"record")
    return chosen[:shared], chosen[-1], rejected[-1]


def read_records(rows: dict[str, list[dict]], read: Callable[[dict, str], T], where: Callable[[str, int], str],
                 on_bad_record: str, what: str) -> dict[str, list[T]]:
    """read(row, where it is) of each row of each split. A malformed row (a UserError) stops the run
    (data.on_bad_record=error) or is left out (skip): then the count and the first message are one line."""
    if on_bad_record not in ON_BAD_RECORD:
        raise UserError(f"data.on_bad_record={on_bad_record!r} is not one of {', '.join(ON_BAD_RECORD)}")
    read_rows, skipped = {}, []
    for split, items in rows.items():
        read_rows[split] = []
        for n, row in enumerate(items):
            try:
                read_rows[split].append(read(row, where(split, n)))
            except UserError as e:
                if on_bad_record == "error":
                    raise
                skipped.append(str(e))
        if not read_rows[split]:
            raise UserError(f"every {split} {what} is malformed, the first: {skipped[-len(items)]}")
    if skipped:
        total = sum(map(len, rows.values()))
        print(f"data: {len(skipped)} of {total} {what}s are malformed and left out (data.on_bad_record=skip), the "
              f"first: {skipped[0]}", flush=True)
    return read_rows
