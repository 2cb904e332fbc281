"""Show which tokens of an instruction record carry loss, after templating and truncation.

    python -m llmtrain.loss_tokens instruction='Define "cat".' output="A small animal."
    python -m llmtrain.loss_tokens record=12 split=val          # a record of the shipped instruct set
    python -m llmtrain.loss_tokens record=0 max_length=48 mask_prompt=false tokenizer=bytes

Each line is one position: the input token, the target it is trained to predict, and whether that target
counts (`loss`) or is masked (`-`), exactly as InstructDataModule builds them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llmtrain.arguments import parse
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError, one_line_errors


@dataclass
class LossTokensArgs:
    """The command line's keys (llmtrain.arguments reads them by their types; `--help` shows these comments)."""

    instruction: str | None = None  # a record of your own: its instruction (with output=)
    input: str = ""  # its input, if any
    output: str | None = None  # the response the model learns to give
    record: int | None = None  # or the record of this index in the shipped instruct set
    split: str = "train"  # the split record= counts in: train, val or test
    max_length: int = 256  # tokens kept of prompt + response (the rest is cut, as in training)
    mask_prompt: bool = True  # the prompt's targets carry no loss
    tokenizer: str = "gpt2"  # gpt2, bytes, or a tokenizer.json


def describe(args: LossTokensArgs) -> list[str]:
    # the record tables import Lightning and datasets (seconds): imported here, so that --help and a mistaken
    # argument answer at once
    from llmtrain.data.sources import SPLITS, load_table_splits
    from llmtrain.data.tables import IGNORE_INDEX, encode_instruction

    if args.max_length < 1:
        raise UserError(f"max_length must be at least 1, got {args.max_length}")
    if args.record is not None:
        if args.split not in SPLITS:
            raise UserError(f"split={args.split} is not a split of the instruct set: choose {', '.join(SPLITS)}")
        rows = load_table_splits("embedded", None, "instruct", split="train", subset=None, val_fraction=0.1,
                                 test_fraction=0.1)[args.split]
        if not 0 <= args.record < len(rows):
            raise UserError(f"record={args.record} is out of range: the {args.split} split has {len(rows)}")
        record = rows[args.record]
    elif args.instruction is None or args.output is None:
        raise UserError("give instruction=... and output=... (and optionally input=...), or record=N")
    else:
        record = {"instruction": args.instruction, "input": args.input, "output": args.output}
    tok = build_tokenizer(args.tokenizer)
    x, y = encode_instruction(tok, record, args.max_length, args.mask_prompt)
    lines = [f"{'pos':>4}  {'input':<20} {'target':<20} counts"]
    for i, (a, b) in enumerate(zip(x, y)):
        # a masked target is still the next token
        shown = b if b != IGNORE_INDEX else (x[i + 1] if i + 1 < len(x) else None)
        target = tok.decode([shown]) if shown is not None else ""
        lines.append(f"{i:>4}  {tok.decode([a])!r:<20} {target!r:<20} {'loss' if b != IGNORE_INDEX else '-'}")
    n_loss = sum(t != IGNORE_INDEX for t in y)
    lines.append(f"{len(x)} positions, {n_loss} carry loss (max_length={args.max_length}, "
                 f"mask_prompt={args.mask_prompt})")
    return lines


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        print("\n".join(describe(parse(LossTokensArgs, sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    main()
