"""Prompt templates: the one place that knows how an instruction record becomes the text a model continues.

Data (training records), generation (`python -m llmtrain.generate`) and a run's outputs (test answers) all
format prompts here, and checkpoints record the template's name (`prompt_template`) so that a model is
always prompted the way it was trained.
"""

from __future__ import annotations

# The Alpaca template (Taori et al., 2023); the response follows "### Response:\n" directly.
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca",)


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """An instruction (and its optional input) in the template; the model's answer continues the result."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA.format(instruction=instruction)


def record_prompt(record: dict, template: str = "alpaca") -> str:
    """The prompt of an instruction record {instruction, input (optional), ...}."""
    return format_prompt(record["instruction"], record.get("input") or "", template)

