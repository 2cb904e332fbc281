"""python -m llmtrain.export source=... out_dir=...: any model llmtrain reads, as a Hugging Face folder of its
family (GPT-2's layout, or for a model with Llama's options Llama's, Qwen2's or Qwen3's).

    python -m llmtrain.export source=outputs/runs/<run> out_dir=exported/my-gpt

source is anything `init_from=` takes: a run dir (its checkpoints/last.ckpt, else its export), an llmtrain `.ckpt`,
an export folder (`<run>/hf`), a Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, Qwen3) or Hub name. It is what
a checkpoint of the middle of a run (e.g. `checkpoints/best-step200.ckpt`) needs to leave llmtrain. Into an existing
out_dir only the export's files are written, each whole or not at all, and the rest is left as it is (a Hub
repository's .git); an earlier export of another architecture or stage needs overwrite=true. transformers loads it
offline, and init_from= reads it back exactly. A mistake ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import MISSING

from llmtrain.arguments import parse
from llmtrain.errors import one_line_errors
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.run.memory import check_loading


@dataclass
class ExportArgs:
    """The command line's keys (llmtrain.arguments reads them by their types; `--help` shows these comments)."""

    source: str = MISSING  # a run dir, an llmtrain .ckpt or export folder, a Hugging Face GPT-2 folder or Hub name
    # (what init_from= takes)
    out_dir: str = MISSING  # the folder to write (config.json, model.safetensors, tokenizer files, llmtrain.json);
    # other files in it (a cloned Hub repository's .git, README.md) are left as they are
    overwrite: bool = False  # replace an export of another architecture or stage, or files llmtrain did not write


def meta_of(info: ModelInfo) -> dict:
    """The record a run would have written with the model (llmtrain.json)."""
    return {"tokenizer": info.tokenizer, "stage": info.stage, "num_classes": info.num_classes,
            "label_names": info.label_names,
            "prompt_template": info.prompt_template, "init_from": info.init_from,
            "init_from_digest": info.init_from_digest, "step": info.step,
            "exported_from": info.path}


def run(source: str, out_dir: str, overwrite: bool = False) -> str:
    """Export source to out_dir; returns the line the command prints."""
    check_loading(describe(source, key="source").model_config, f"source={source}", "load and export", copies=3)
    model, info = load_pretrained(source, key="source")
    out = export_hf(model, out_dir, meta_of(info), overwrite)
    if info.num_classes is not None:
        what, auto = f"a classifier of {', '.join(info.label_names or [])}", "AutoModelForSequenceClassification"
    else:
        what, auto = "a language model", "AutoModelForCausalLM"
    return (f"exported {info.path} ({what}, {model.num_params():,} parameters, tokenizer {info.tokenizer}) to {out}: "
            f"transformers' {auto} and AutoTokenizer load it")


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        args = parse(ExportArgs, sys.argv[1:] if argv is None else argv)
        print(run(args.source, args.out_dir, args.overwrite))


if __name__ == "__main__":
    main()
