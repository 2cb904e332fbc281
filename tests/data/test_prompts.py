"""The instruct template: the exact Alpaca text, the input section only with an input, and which stages use it."""

import pytest

from llmtrain.data.prompts import format_prompt, record_prompt
from llmtrain.stages.classify import Classify
from llmtrain.stages.dpo import DPO
from llmtrain.stages.instruct import Instruct
from llmtrain.stages.pretrain import Pretrain

HEAD = "Below is an instruction that describes a task"


def test_an_instruction_is_the_alpaca_text_the_response_continues():
    assert format_prompt("Define ghost.") == (
        f"{HEAD}. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDefine ghost.\n\n### Response:\n")


def test_an_input_gets_its_section_and_an_empty_or_missing_one_none():
    assert format_prompt("Define it.", "ghost") == (
        f"{HEAD}, paired with an input that provides further context. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDefine it.\n\n### Input:\nghost\n\n### Response:\n")
    plain = format_prompt("Define it.")
    assert format_prompt("Define it.", "") == plain
    assert record_prompt({"instruction": "Define it.", "input": None, "output": "x"}) == plain
    assert record_prompt({"instruction": "Define it.", "output": "x"}) == plain
    assert record_prompt({"instruction": "Define it.", "input": "ghost"}) == format_prompt("Define it.", "ghost")


def test_instruction_stages_are_templated_and_text_and_labels_are_not():
    assert [stage.prompt_template for stage in (Instruct, DPO, Classify, Pretrain)] == ["alpaca", "alpaca", None, None]
    with pytest.raises(ValueError, match="unknown prompt template 'chatml': choose one of alpaca"):
        format_prompt("Define it.", template="chatml")
