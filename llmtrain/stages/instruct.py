"""Instruction tuning: Alpaca-format records (instruction, input, output), the prompt masked, so that the loss is
the response's tokens averaged over the whole optimizer step (a short answer weighs less than a long one). At each
validation a few held-out instructions are answered in TensorBoard's text tab; at the end the test split's are
answered greedily into test_generations.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmtrain.data.prompts import record_prompt
from llmtrain.files import write_atomic
from llmtrain.model.gpt import GPT
from llmtrain.stages.pretrain import Pretrain
from llmtrain.stages.text import generate_text

TEST_GENERATIONS = "test_generations.jsonl"


class Instruct(Pretrain):
    """The language-modelling loss on responses; held-out instructions as samples; test answers written at the end."""

    name = "instruct"
    data_module = "InstructDataModule"
    data_presets = "data=instruct_embedded or data=alpaca"
    prompt_template = "alpaca"
    counts_vary = True  # response tokens per record differ
    outputs = ("test answers",)  # TEST_GENERATIONS

    def __init__(self, train_blocks: str | int, lora: dict | None, loss_chunk: int | None, num_samples: int,
                 sample_tokens: int, test_generations: int | None, max_new_tokens: int) -> None:
        super().__init__(train_blocks, lora, loss_chunk, sample_prompt=None, sample_tokens=sample_tokens)
        self.num_samples = num_samples  # held-out instructions answered at each validation
        self.test_generations = test_generations  # test answers written at the end (None: all)
        self.max_new_tokens = max_new_tokens  # new tokens per test answer

    def setup(self, datamodule) -> None:
        self.sample_prompts = [record_prompt(r, self.prompt_template)
                               for r in datamodule.records["val"][: self.num_samples]]

    def write_files(self, model: GPT, datamodule, run_dir: Path) -> list[str]:
        """Answer the test split's instructions greedily; instruction, input, reference and answer as JSONL."""
        records = datamodule.records["test"]
        records = records[: self.test_generations] if self.test_generations is not None else records
        path, lines = run_dir / TEST_GENERATIONS, []
        for r in records:
            answer = generate_text(model, datamodule.tokenizer, record_prompt(r, self.prompt_template),
                                   self.max_new_tokens, temperature=0)
            lines.append(json.dumps({"instruction": r["instruction"], "input": r.get("input") or "",
                                     "reference": r["output"], "generated": answer.strip()}) + "\n")
        write_atomic(path, "".join(lines))
        return [f"{len(records)} test answers in {path}"]
