"""Conversation records: OpenAI's messages and ShareGPT's conversations read alike, every malformed record one line
naming the split, the record and the field."""

import pytest

from llmtrain.data.conversations import read_conversation
from llmtrain.errors import UserError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello again"}]


def test_messages_are_read_as_given():
    assert read_conversation({"messages": MESSAGES, "id": 3}, "train record 0") == MESSAGES


def test_sharegpt_conversations_become_messages():
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in MESSAGES]}
    assert read_conversation(record, "train record 0") == MESSAGES


def test_a_conversation_may_start_without_a_system_message_and_end_with_a_user_turn():
    messages = MESSAGES[1:4]
    assert read_conversation({"messages": messages}, "val record 0") == messages


def changed(i: int, **item) -> dict:
    return {"messages": [dict(m, **item) if n == i else m for n, m in enumerate(MESSAGES)]}


@pytest.mark.parametrize(("record", "expected"), [
    (changed(2, role="bot"), "val record 7: messages[2].role='bot' is not a role: use one of system, user, assistant"),
    (changed(3, content="  "), "val record 7: messages[3].content is empty"),
    (changed(1, content=None), "val record 7: messages[1].content is empty"),
    ({"messages": MESSAGES[:2]}, "val record 7: messages has no assistant turn"),
    ({"messages": [MESSAGES[0], MESSAGES[2], MESSAGES[1]]},
     "val record 7: messages[1].role is 'assistant' where 'user' was due"),
    ({"messages": [*MESSAGES[1:3], MESSAGES[2]]}, "val record 7: messages[2].role is 'assistant' where 'user'"),
    ({"messages": [*MESSAGES[:3], MESSAGES[0]]}, "val record 7: messages[3].role is 'system' where 'user'"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "x"}]},
     "val record 7: conversations[1].from='bard' is not a role: use one of system, human, user, gpt, assistant"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
     "val record 7: conversations[1].value is empty"),
    ({"messages": []}, "val record 7: messages is not a non-empty list"),
    ({"messages": ["Hi"]}, "val record 7: messages[0] is not an object with 'role' and 'content'"),
    ({"text": "Hi"}, "val record 7 has neither 'messages' (role/content) nor 'conversations' (from/value) "
                     "(columns: text)"),
])
def test_a_malformed_record_is_one_line_naming_split_record_and_field(record, expected):
    with pytest.raises(UserError) as e:
        read_conversation(record, "val record 7")
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
