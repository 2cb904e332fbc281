"""Instruction tuning: the held-out instructions sampled at validation, and the greedy test answers at the end."""

import json
from types import SimpleNamespace

import torch

from llmtrain.data.prompts import record_prompt
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.instruct import TEST_GENERATIONS, Instruct
from llmtrain.stages.text import generate_text

TOK = build_tokenizer("bytes")


def records(split: str, n: int) -> list[dict]:
    return [{"instruction": f"Name {split} thing {i}.", "input": "in a word" if i % 2 else "", "output": f"{i}"}
            for i in range(n)]


DATA = SimpleNamespace(tokenizer=TOK, records={s: records(s, 3) for s in ("train", "val", "test")})


def instruct(test_generations: int | None = None, num_samples: int = 0) -> Instruct:
    return Instruct(train_blocks="all", lora=None, loss_chunk=None, num_samples=num_samples, sample_tokens=2,
                    test_generations=test_generations, max_new_tokens=6)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=257, context_length=256, emb_dim=16, n_heads=2, n_layers=1)).eval()


def test_the_samples_are_the_first_validation_instructions_in_the_template():
    stage = instruct(num_samples=2)
    stage.setup(DATA)
    assert stage.sample_prompts == [record_prompt(r, "alpaca") for r in DATA.records["val"][:2]]
    assert stage.sample_prompts[0].startswith("Below is an instruction") and "val thing 0" in stage.sample_prompts[0]


def test_the_test_answers_are_greedy_continuations_of_the_templated_instructions(tmp_path):
    model = tiny_gpt()
    said = instruct(test_generations=2).write_files(model, DATA, tmp_path)
    assert said == [f"2 test answers in {tmp_path / TEST_GENERATIONS}"]
    lines = [json.loads(line) for line in (tmp_path / TEST_GENERATIONS).read_text().splitlines()]
    expected = [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
                 "generated": generate_text(model, TOK, record_prompt(r, "alpaca"), 6, temperature=0).strip()}
                for r in DATA.records["test"][:2]]
    assert lines == expected
    assert all(len(TOK.encode(line["generated"])) >= 4 for line in lines)  # answers of max_new_tokens, not 2


def test_test_generations_zero_answers_nothing_and_none_answers_all(tmp_path):
    assert instruct(test_generations=0).write_files(tiny_gpt(), DATA, tmp_path)[0].startswith("0 test answers")
    assert (tmp_path / TEST_GENERATIONS).read_text() == ""
    assert instruct(test_generations=None).write_files(tiny_gpt(), DATA, tmp_path)[0].startswith("3 test answers")
