"""DPO on conversations: preference records of messages rendered by the chat template as finetune=chat renders them,
only the final assistant turn scored; the two layouts (a prompt of messages, or whole conversations sharing a
prefix); malformed records one line each, or skipped and counted; and the template's tokens required."""

import json

import pytest
from conftest import conversation, make_datamodule

from llmtrain.data.chat_template import CHATML, ChatTemplate, chat_tokenizer
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.losses import IGNORE_INDEX

CHATML_BYTES = chat_tokenizer("bytes", "chatml")


def prompt_records(n: int) -> list[dict]:
    """Multi-turn prompts (a system message, an earlier answer) with the final answer as a message or as text."""
    return [{"prompt": conversation(f"Item {i}?", f"Item {i} is a box.", "How heavy?", system="Be exact."),
             "chosen": {"role": "assistant", "content": f"Gladly: {i % 7 + 1} kg."}, "rejected": f"No. {i} kg."}
            for i in range(n)]


def write(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def setup(path: str, **keys):
    dm = make_datamodule("preference_json", path=path, tokenizer=CHATML_BYTES, context_length=512, **keys)
    dm.setup()
    return dm


def test_each_side_is_the_rendered_conversation_and_only_its_final_turn_is_scored(tmp_path):
    dm = setup(write(tmp_path / "p.jsonl", prompt_records(40)))
    template = ChatTemplate(CHATML, build_tokenizer(CHATML_BYTES))
    batch = dm.collate(dm.sets["val"].items[:3])
    for i, record in enumerate(dm.records["val"][:3]):
        for row, side in ((i, "chosen"), (i + 3, "rejected")):
            whole = template.encode(template.render([*record["prompt"], record[side]]))
            n = int(batch["lengths"][row])
            assert batch["input_ids"][row, :n].tolist() == whole[:-1]
            labels = batch["labels"][row].tolist()
            prompt = template.encode(template.render(record["prompt"], add_generation_prompt=True))
            assert labels[: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)  # the earlier answer too
            answer = template.encode(record[side]["content"] + "<|im_end|>")
            assert [t for t in labels if t != IGNORE_INDEX] == answer  # the turn and its end, not the line break
            assert labels[len(prompt) - 1: n] == whole[len(prompt): n + 1][: len(answer)] + [IGNORE_INDEX] * (
                n - len(prompt) + 1 - len(answer))


def test_whole_conversations_sharing_a_prefix_give_the_same_pairs(tmp_path):
    """chosen and rejected as whole conversations (no prompt column, or one repeated in them): the shared part is
    the prompt, and the pairs are those of the prompt + final turn layout."""
    records = prompt_records(40)
    whole = [{"chosen": [*r["prompt"], r["chosen"]], "rejected": [*r["prompt"], {"role": "assistant",
                                                                                 "content": r["rejected"]}]}
             for r in records]
    repeated = [w | {"prompt": r["prompt"]} for w, r in zip(whole, records, strict=True)]
    expected = setup(write(tmp_path / "p.jsonl", records)).sets
    for name, rows in (("whole", whole), ("repeated", repeated)):
        sets = setup(write(tmp_path / f"{name}.jsonl", rows)).sets
        assert all(sets[s].items == expected[s].items for s in expected), name


BAD = {
    "role": ({"chosen": {"role": "robot", "content": "x"}}, " (chosen): messages[4].role='robot' is not a role"),
    "empty": ({"rejected": ""}, " (rejected): messages[4].content is empty"),
    "type": ({"chosen": 3}, ": chosen is int, not text, a message or a list of messages"),
    "two turns": ({"chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
                  ": chosen does not end in one assistant turn after the prompt"),
    "order": ({"prompt": conversation("Hi", "Hello")},
              " (chosen): messages[2].role is 'assistant' where 'user' was due"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_malformed_record_is_one_line_naming_it_and_its_field_or_is_skipped_and_counted(tmp_path, case, capsys):
    records = prompt_records(40)
    change, message = BAD[case]
    records[7] = records[7] | change
    path = write(tmp_path / "p.jsonl", records)
    with pytest.raises(UserError, match=r"^data.path row 7 \(train record 6\)" + re_escape(message)) as e:
        setup(path)
    assert "\n" not in str(e.value)
    dm = setup(path, on_bad_record="skip")
    assert sum(len(dm.records[s]) for s in dm.records) == 39
    out = capsys.readouterr().out
    assert out.count("malformed") == 1 and "data: 1 of 40 pairs are malformed and left out (data.on_bad_record=skip)"\
        in out


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(tmp_path):
    """DPO adds no tokens: a plain bytes tokenizer cannot render ChatML; the alpaca template needs none."""
    path = write(tmp_path / "p.jsonl", prompt_records(40))
    with pytest.raises(UserError, match=r"^data.chat_template writes <\|im_start\|>, <\|im_end\|>, which tokenizer "
                                        r"bytes lacks: start DPO from a chat fine-tune"):
        make_datamodule("preference_json", path=path, tokenizer="bytes", context_length=512).setup()
    dm = make_datamodule("preference_json", path=path, tokenizer="bytes", context_length=512, chat_template="alpaca")
    dm.setup()
    assert dm.conversational and len(dm.sets["train"]) > 0


def test_text_records_stay_in_the_instruct_template_and_a_mixed_table_is_refused(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No."} for i in range(40)]
    dm = setup(write(tmp_path / "t.jsonl", rows))
    assert not dm.conversational and dm.records["train"][0]["prompt"].startswith("Q")
    rows[7]["chosen"] = {"role": "assistant", "content": "A."}
    with pytest.raises(UserError, match=r"^data.path row 7 \(train record 6\): data.chosen_column='chosen' holds "
                                        r"dict, not text, where the table's first record holds text"):
        setup(write(tmp_path / "t.jsonl", rows))


def test_text_pairs_with_format_chat_are_the_conversation_of_one_user_turn(tmp_path):
    """data.format=chat renders a text prompt as the user's turn (after data.system) and each text response as the
    assistant's, through the chat template: the pairs of the same records written as messages. format=auto keeps
    text in the instruct template; an unknown format is one line."""
    text = [{"prompt": f"Define item {i}.", "chosen": f"A box of {i} kg.", "rejected": f"No. {i}."} for i in range(40)]
    messages = [{"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": r["prompt"]}],
                 "chosen": r["chosen"], "rejected": r["rejected"]} for r in text]
    as_chat = setup(write(tmp_path / "text.jsonl", text), format="chat", system="Be exact.")
    as_messages = setup(write(tmp_path / "messages.jsonl", messages))
    assert as_chat.conversational and as_chat.records["val"] == as_messages.records["val"]
    assert as_chat.sets["train"].items == as_messages.sets["train"].items
    assert not setup(str(tmp_path / "text.jsonl")).conversational  # auto: text goes into the Alpaca template
    no_system = setup(str(tmp_path / "text.jsonl"), format="chat")
    assert [m["role"] for m in no_system.records["val"][0]["prompt"]] == ["user"]
    with pytest.raises(UserError, match=r"^data.format='dialog' is not one of auto, instruct, chat$"):
        setup(str(tmp_path / "text.jsonl"), format="dialog")
