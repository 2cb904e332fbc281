"""Conversations: records of messages, read from the two layouts chat data comes in and checked once.

- OpenAI's: `messages: [{"role": "system"|"user"|"assistant", "content": "..."}, ...]`;
- ShareGPT's: `conversations: [{"from": "system"|"human"|"gpt", "value": "..."}, ...]`, converted on read.

A conversation is an optional system message, then user and assistant turns alternating, starting with the user,
with at least one assistant turn. A record that is not one is a UserError naming the record (its row in the file, or
its split and number) and the field, so that a bad line of a file of thousands is found at once.
"""

from __future__ import annotations

from llmtrain.errors import UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = {"messages": ("role", "content", None), "conversations": ("from", "value", SHAREGPT_ROLES)}

Message = dict[str, str]


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
