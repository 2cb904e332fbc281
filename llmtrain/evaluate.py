"""Score a model on benchmark tasks through EleutherAI's lm-evaluation-harness:
python -m llmtrain.evaluate ckpt_path=outputs/runs/<run> tasks=[llmtrain_definitions]

ckpt_path takes what `python -m llmtrain.generate` takes: an llmtrain checkpoint (`.ckpt`) or run dir, an export
dir, a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 dir or Hub name, a LoRA adapter dir. tasks are lm_eval
task names: the two shipped with llmtrain, which run offline on the held-out split of the embedded data
(llmtrain_definitions: the right definition of a headword among four, chance 25%; llmtrain_perplexity: the
perplexity of held-out text), those of a folder of task YAMLs (tasks_dir=), or lm_eval's own (hellaswag, arc_easy,
... : their datasets come from the Hugging Face Hub). The scores are printed as lm_eval's table and written as its
JSON into the run dir's eval/ (or out_dir=). Needs the eval extra: pip install 'llmtrain[eval]'.

Arguments are `key=value` pairs, read as training's overrides are (`--help` lists them).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from llmtrain.arguments import parse
from llmtrain.errors import UserError, one_line_errors
from llmtrain.files import write_atomic


@dataclass
class EvaluateArgs:
    """The command line's keys (llmtrain.arguments reads them by their types; `--help` shows these comments)."""

    ckpt_path: str = MISSING  # an llmtrain .ckpt, run dir or export dir, a Hugging Face dir or Hub name, a LoRA
    # adapter dir (what generate's ckpt_path takes), e.g. ckpt_path=outputs/runs/<run>
    tasks: list[str] = field(default_factory=lambda: ["llmtrain_definitions", "llmtrain_perplexity"])  # lm_eval
    # task, group or tag names: llmtrain's (these two), tasks_dir's, lm_eval's own
    tasks_dir: str | None = None  # a folder of your own task YAMLs (data_files relative to each YAML)
    limit: float | None = None  # the first N documents of each task (a number below 1: that share of them)
    batch_size: int = 16  # log-likelihood requests per forward pass
    max_gen_toks: int = 256  # generated tokens of a generation task that sets none
    device: str = "auto"  # cuda if available, else cpu
    base: str | None = None  # base model of a LoRA adapter dir, when llmtrain_adapter.json does not name it
    out_dir: str | None = None  # where the results JSON goes; default: <run dir>/eval
    seed: int = 1234  # lm_eval's seeds (few-shot sampling, ...)
    bootstrap_iters: int = 1000  # resamples for the standard errors of metrics without a closed form (0: none)
    apply_chat_template: bool = False  # a chat model: each request as a conversation through its chat template (the
    # user's turn, few-shot examples as earlier turns), as lm_eval's --apply_chat_template does
    chat_template: str | None = None  # with apply_chat_template: null = the model's own; chatml | alpaca | a Jinja
    # file | a tokenizer_config.json
    system_instruction: str | None = None  # with apply_chat_template: a system message before each request


def parse_args(argv: list[str]) -> EvaluateArgs:
    args = parse(EvaluateArgs, argv)
    problems = []
    if not args.tasks:
        problems.append("tasks is empty: give task names, e.g. tasks=[llmtrain_definitions,llmtrain_perplexity]")
    if args.limit is not None and args.limit <= 0:
        problems.append(f"limit must be positive (N documents, or a share below 1), got {args.limit}")
    if args.batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {args.batch_size}")
    if args.max_gen_toks < 1:
        problems.append(f"max_gen_toks must be at least 1, got {args.max_gen_toks}")
    if args.bootstrap_iters < 0:
        problems.append(f"bootstrap_iters must be >= 0, got {args.bootstrap_iters}")
    if not args.apply_chat_template and (args.chat_template or args.system_instruction):
        problems.append("chat_template and system_instruction apply to chat models only: add apply_chat_template=true")
    if problems:
        raise UserError("; ".join(problems))
    return args


def results_dir(ckpt_path: str, out_dir: str | None) -> Path:
    """out_dir, else the eval/ folder of the run dir that ckpt_path is or lies in (a run dir, its checkpoints/*.ckpt
    or its export hf/)."""
    if out_dir is not None:
        return Path(out_dir).expanduser()
    path = Path(ckpt_path).expanduser()
    if path.is_file() and path.parent.name == "checkpoints":
        return path.parent.parent / "eval"
    for run in (path, path.parent):  # the run dir, or its export hf/
        if path.is_dir() and (run / "checkpoints").is_dir():
            return run / "eval"
    raise UserError(f"out_dir is not set and ckpt_path={ckpt_path} is not an llmtrain run dir (nor in one): give "
                    "out_dir=<the folder for the results>")


def run(args: EvaluateArgs) -> str:
    """Load the model and the tasks, score, write the JSON; returns what the command prints."""
    try:
        from llmtrain.interop.harness import GPTHarnessLM
        from llmtrain.interop.harness_tasks import load_tasks, results_json, results_table, run_tasks
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}): pip install 'llmtrain[eval]'") from e
    from llmtrain.data.tokenizer import build_tokenizer
    from llmtrain.generate import load_model
    from llmtrain.run.decoding import resolve_device

    out = results_dir(args.ckpt_path, args.out_dir)
    device = resolve_device(args.device)
    loaded = load_tasks(args.tasks, args.tasks_dir)  # before the weights: a task that cannot load stops early
    model, info = load_model(args.ckpt_path, args.base)
    tok, template = build_tokenizer(info.tokenizer), None
    if args.apply_chat_template:  # the template the chat command would use
        from llmtrain.data.chat_template import ChatTemplate, model_template

        template = ChatTemplate(model_template(args.chat_template, info.tokenizer, info.chat_template), tok)
    lm = GPTHarnessLM(model.to(device), tok, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                      name=str(args.ckpt_path), template=template)
    start = time.perf_counter()
    results = run_tasks(lm, loaded, limit=args.limit, bootstrap_iters=args.bootstrap_iters, seed=args.seed,
                        apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction)
    seconds = time.perf_counter() - start
    results["config"]["model"] = str(args.ckpt_path)
    results["config"]["llmtrain"] = {"ckpt_path": str(args.ckpt_path), "model_path": info.path,
                                     "tokenizer": info.tokenizer, "step": info.step, "seconds": round(seconds, 1),
                                     "chat_template": template and template.source,
                                     "system_instruction": args.system_instruction}
    file = out / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S')}.json"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(file, results_json(results))
    return f"{results_table(results)}\n{info.path}: {seconds:.1f} s on {device}; results written to {file}"


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        print(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
