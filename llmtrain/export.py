"""python -m llmtrain.export SOURCE OUT_DIR: any model llmtrain reads, as a Hugging Face folder of its family
(GPT-2's layout, or Llama's for a model with Llama's options).

SOURCE is anything `init_from=` takes: a run dir (its checkpoints/last.ckpt, else its export), an llmtrain `.ckpt`,
an export folder (`<run>/hf`), a Hugging Face GPT-2 or Llama folder or Hub name.
This is what runs made before the Hugging Face export need, and what a checkpoint of the middle of a run (e.g.
`checkpoints/best-step200.ckpt`) needs to leave llmtrain. OUT_DIR is written whole or not at all, and an existing
folder is replaced only when it is an export (or empty). A mistake ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from llmtrain.errors import UserError, one_line_errors
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import load_pretrained


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the usage and exits; one line is our convention
        raise UserError(f"{message} (usage: python -m llmtrain.export SOURCE OUT_DIR; --help says more)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="python -m llmtrain.export",
                    description="Write any model llmtrain reads as a Hugging Face GPT-2 folder (transformers loads "
                                "it offline; init_from= reads it back exactly).",
                    epilog="e.g. python -m llmtrain.export outputs/runs/<run> exported/my-gpt")
    parser.add_argument("source", help="a run dir, an llmtrain .ckpt or export folder, a Hugging Face GPT-2 "
                                       "folder or Hub name (what init_from= takes)")
    parser.add_argument("out_dir", help="the folder to write (config.json, model.safetensors, tokenizer files, "
                                        "llmtrain.json)")
    return parser.parse_args(argv)


def meta_of(info: ModelInfo) -> dict:
    """The record a run would have written with the model (llmtrain.json)."""
    return {"tokenizer": info.tokenizer, "stage": info.stage, "num_classes": info.num_classes,
            "label_names": info.label_names,
            "prompt_template": info.prompt_template, "init_from": info.init_from, "step": info.step,
            "exported_from": info.path}


def run(source: str, out_dir: str) -> str:
    """Export source to out_dir; returns the line the command prints."""
    model, info = load_pretrained(source, key="source")
    out = export_hf(model, out_dir, meta_of(info))
    if info.num_classes is not None:
        what, auto = f"a classifier of {', '.join(info.label_names or [])}", "AutoModelForSequenceClassification"
    else:
        what, auto = "a language model", "AutoModelForCausalLM"
    return (f"exported {info.path} ({what}, {model.num_params():,} parameters, tokenizer {info.tokenizer}) to {out}: "
            f"transformers' {auto} and AutoTokenizer load it")


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        print(run(args.source, args.out_dir))


if __name__ == "__main__":
    main()
