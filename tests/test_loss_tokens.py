"""python -m llmtrain.loss_tokens: which targets of an instruction record carry loss, a line per position, exactly as
InstructDataModule builds them; bad values are one line (the real command: tests/stages/test_stages.py)."""

import pytest

from llmtrain.errors import UserError
from llmtrain.loss_tokens import LossTokensArgs, describe


def test_a_line_per_position_with_its_target_masked_or_carrying_loss():
    """Alpaca's prompt (141 bytes around "Hi") is masked, but each of its lines still shows the next token; the
    response's two bytes and the end of text carry loss."""
    lines = describe(LossTokensArgs(instruction="Hi", output="Yo", tokenizer="bytes"))
    assert lines[0] == " pos  input                target               counts"
    assert lines[1] == "   0  'B'                  'e'                  -"
    assert lines[-5:] == [" 140  ':'                  '\\n'                 -",
                          " 141  '\\n'                 'Y'                  loss",
                          " 142  'Y'                  'o'                  loss",
                          " 143  'o'                  '<|endoftext|>'      loss",
                          "144 positions, 3 carry loss (max_length=256, mask_prompt=True)"]
    cut = describe(LossTokensArgs(instruction="Hi", output="Yo", tokenizer="bytes", max_length=142,
                                  mask_prompt=False))
    assert cut[-1] == "142 positions, 142 carry loss (max_length=142, mask_prompt=False)"
    assert cut[-2] == " 141  '\\n'                 'Y'                  loss"  # the response cut after one byte


def test_record_counts_in_the_split_it_names():
    from llmtrain.data.sources import load_table_splits

    rows = load_table_splits("embedded", None, "instruct", split="train", subset=None, val_fraction=0.1,
                             test_fraction=0.1)["val"]
    last = rows[-1]
    shown = describe(LossTokensArgs(record=len(rows) - 1, split="val", tokenizer="bytes"))
    assert shown == describe(LossTokensArgs(instruction=last["instruction"], input=last["input"],
                                            output=last["output"], tokenizer="bytes"))
    with pytest.raises(UserError, match=rf"^record={len(rows)} is out of range: the val split has {len(rows)}$"):
        describe(LossTokensArgs(record=len(rows), split="val"))


@pytest.mark.parametrize("args, message", [
    (LossTokensArgs(instruction="Hi", output="Yo", max_length=0), "max_length must be at least 1, got 0"),
    (LossTokensArgs(record=0, split="dev"), "split=dev is not a split of the instruct set: choose train, val, test"),
    (LossTokensArgs(instruction="Hi"), "give instruction=... and output=... (and optionally input=...), or record=N"),
])
def test_bad_values_are_refused_in_one_line(args, message):
    with pytest.raises(UserError) as e:
        describe(args)
    assert str(e.value) == message
