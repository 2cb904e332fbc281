"""Generate text from a trained model: python -m llmtrain.generate ckpt_path=... prompt="Once upon a time"

ckpt_path takes an llmtrain checkpoint (`.ckpt`) or run directory, an llmtrain export directory (config.json +
model.safetensors), a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 directory or Hub name (anything
`pretrained.load_pretrained` reads; a Llama-shaped folder brings its tokenizer.json), or a LoRA adapter directory
(adapter_config.json; its base comes from llmtrain_adapter.json or `base=`), which is merged into the base before
generating.

Arguments are `key=value` pairs, read as training's overrides are (`--help` lists them), without Hydra's
composition so that the command starts in about a second.
`show_top=K` prints the K likeliest next tokens instead of generating: a window into the model.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import MISSING

from llmtrain.arguments import parse
from llmtrain.data.prompts import format_prompt
from llmtrain.data.tokenizer import build_tokenizer, find_tokenizer
from llmtrain.errors import UserError, one_line_errors
from llmtrain.interop.adapters import is_hf_adapter
from llmtrain.interop.checkpoints import ModelInfo
from llmtrain.interop.digest import changed_weights
from llmtrain.interop.lora import ADAPTER_META, load_adapter, merge
from llmtrain.interop.pretrained import describe, load_pretrained
from llmtrain.model.gpt import GPT
from llmtrain.run.decoding import PRECISIONS, decode_precision, precision_note, prepare_for_decoding, resolve_device
from llmtrain.run.memory import check_loading
from llmtrain.stages.text import encode_prompt, generate_text


@dataclass
class GenerateArgs:
    """The command line's keys (llmtrain.arguments reads them by their types; `--help` shows these comments)."""

    ckpt_path: str = MISSING  # an llmtrain .ckpt, run dir or export dir, a Hugging Face dir (GPT-2, Llama, Qwen, ...)
    # or Hub name, or a LoRA adapter dir, e.g. ckpt_path=outputs/runs/<run>
    base: str | None = None  # base model of a LoRA adapter dir, when llmtrain_adapter.json does not name it
    prompt: str | None = None  # the text to continue; required unless instruction is given
    instruction: str | None = None  # wrapped in the Alpaca template, with input
    input: str = ""  # the instruction's input (or the prompt's, for an instruction-tuned model)
    raw: bool = False  # do not wrap prompt= in the checkpoint's instruction template
    max_new_tokens: int = 80
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50  # null or 0 = no top-k filter
    top_p: float | None = None  # nucleus sampling; null = off
    seed: int = 1234
    device: str = "auto"  # cuda if available, else cpu
    precision: str = "auto"  # auto | fp32 | bf16 | int8: the weights' format while decoding (see decode_precision)
    use_cache: bool = True  # KV cache: each new token costs one position instead of the whole context
    show_top: int | None = None  # print the K likeliest next tokens instead of generating
    echo: bool = False  # print the prompt before the continuation


# --- command line -------------------------------------------------------------------------------------------


MAX_NEW_TOKENS = 1_000_000  # one call's output buffer: 8 MB per row; beyond it a typo (10**12: 8 TB) allocates


def parse_args(argv: list[str]) -> GenerateArgs:
    """['key=value', ...] -> GenerateArgs, its values checked together (`--help` prints the keys and exits)."""
    args = parse(GenerateArgs, argv)
    validate(args)
    return args


def validate(args: GenerateArgs) -> None:
    """Every rule that the values alone decide, reported together."""
    problems = []
    if args.prompt is None and args.instruction is None:
        problems.append('prompt is not set: give prompt="..." (or instruction="..." for an instruction-tuned model)')
    if args.prompt is not None and args.instruction is not None:
        problems.append("prompt and instruction are both set: give one (instruction= wraps it in the Alpaca template)")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        problems.append(f"max_new_tokens must lie in [1, {MAX_NEW_TOKENS:,}] (the tokens of one call, held in memory "
                        f"with the prompt), got {args.max_new_tokens:,}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        problems.append(f"top_k must be >= 0 (0 or null = off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"top_p must lie in (0, 1] (null = off), got {args.top_p}")
    if args.show_top is not None and args.show_top < 1:
        problems.append(f"show_top must be at least 1, got {args.show_top}")
    if args.precision not in PRECISIONS:
        problems.append(f"precision={args.precision!r} is not known: choose one of {', '.join(PRECISIONS)}")
    if args.device not in ("auto", "cpu") and not args.device.startswith(("cuda", "mps")):
        problems.append(f"device={args.device!r} is not known: choose auto, cpu, cuda or cuda:N")
    if problems:
        raise UserError("; ".join(problems))


# --- loading ------------------------------------------------------------------------------------------------


def load_model(ckpt_path: str, base: str | None = None, max_new_tokens: int = 0) -> tuple[GPT, ModelInfo]:
    """ckpt_path -> (GPT in eval mode on the CPU, its ModelInfo).

    Refuses before reading any weights classifiers (their head has one row per label, not per token) and models
    whose stated sizes would not fit in memory with max_new_tokens generated (the memory pre-flight).
    """
    path = Path(ckpt_path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path, ckpt_path, base, max_new_tokens)
    info = describe(ckpt_path, key="ckpt_path")
    _refuse_classifier(ckpt_path, info.num_classes, info.label_names)
    check_loading(info.model_config, f"ckpt_path={ckpt_path}", "load and generate", copies=2,
                  context_tokens=info.model_config.context_length + max_new_tokens)
    return load_pretrained(ckpt_path, key="ckpt_path")


def _refuse_classifier(ckpt_path: str, num_classes: int | None, label_names: list | None) -> None:
    if num_classes is None:
        return
    labels = [str(label) for label in label_names or []]
    shown = ", ".join(labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "") or "unknown"
    raise UserError(f"ckpt_path={ckpt_path} is a classifier (labels: {shown}): it predicts labels, it does not "
                    "generate text")


def _load_adapter_dir(path: Path, ckpt_path: str, base: str | None, max_new_tokens: int) -> tuple[GPT, ModelInfo]:
    """A LoRA adapter dir: load its base, put the adapter on, merge it into plain weights."""
    if is_hf_adapter(path):
        raise UserError(f"ckpt_path={ckpt_path} is a LoRA adapter for a transformers class (its layers have that "
                        "class's names): give the run's adapter/ (llmtrain's names) or its merged model hf/ instead")
    meta: dict = {}
    if (path / ADAPTER_META).is_file():
        try:
            meta = json.loads((path / ADAPTER_META).read_text())
        except ValueError as e:
            raise UserError(f"ckpt_path={ckpt_path}: {ADAPTER_META} is not readable JSON ({e})") from e
    _refuse_classifier(ckpt_path, meta.get("num_classes"), meta.get("label_names"))
    base = base or meta.get("base")
    if not base:
        raise UserError(f"ckpt_path={ckpt_path} is a LoRA adapter, but its base model is unknown (no 'base' in "
                        f"{path / ADAPTER_META}): give it as base=<init_from used for training>")
    if not Path(base).expanduser().exists() and (path / base).exists():  # a path relative to the adapter dir
        base = str(path / base)
    if now := changed_weights(base, meta.get("init_from_digest"), key="base"):
        raise UserError(f"ckpt_path={ckpt_path} is a LoRA adapter trained on other weights than {base} holds now "
                        f"(content digest {now[7:19]}, then {meta['init_from_digest'][7:19]}): give base=<the weights "
                        "it was trained on>")
    model, info = load_model(base, max_new_tokens=max_new_tokens)
    try:
        merged = merge(load_adapter(model, path))
    except RuntimeError as e:  # peft's size mismatch: e.g. a classification head saved with the adapter
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ckpt_path={ckpt_path}: the adapter does not fit its base {base} ({first}); a LoRA run "
                        "with a new head (modules_to_save) is a classifier, which does not generate text") from e
    info = replace(info, path=str(path), stage=meta.get("stage") or info.stage,
                   prompt_template=meta.get("prompt_template") or info.prompt_template,
                   tokenizer=find_tokenizer(meta["tokenizer"], path) if meta.get("tokenizer") else info.tokenizer,
                   extra={**info.extra, "adapter": str(path), "base": base})
    return merged.eval(), info


# --- prompting and generation ---------------------------------------------------------------------------------


def build_prompt(template: str | None, prompt: str | None, instruction: str | None = None, input: str = "",
                 raw: bool = False) -> str:
    """The text the model continues: instruction (+ input) in the template (the checkpoint's, else Alpaca), or
    prompt, wrapped the same way when the checkpoint was instruction-tuned (it names a template) unless raw."""
    if instruction is not None:
        return format_prompt(instruction, input, template or "alpaca")
    if prompt is None:
        raise UserError('prompt is not set: give prompt="..." (or instruction="...")')
    if template and not raw:
        return format_prompt(prompt, input, template)
    if input:
        raise UserError("input= goes with instruction= (or with an instruction-tuned checkpoint): "
                        "give instruction=... input=..., or put the input into prompt=")
    return prompt


@torch.no_grad()
def top_candidates(model: GPT, tokenizer, prompt: str, k: int) -> list[tuple[int, str, float]]:
    """The k likeliest next tokens after prompt: (token id, decoded token, probability in [0, 1]), likeliest first."""
    idx = encode_prompt(model, tokenizer, prompt)
    probs = model(idx)[0, -1].float().softmax(dim=-1)  # (V,)
    top = torch.topk(probs, min(k, probs.numel()))
    return [(i, _token_text(tokenizer, i), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def _token_text(tokenizer, i: int) -> str:
    """One token as text; a token holding part of a UTF-8 character shows its bytes (\\xe2) instead of U+FFFD."""
    if i >= tokenizer.n_vocab:
        return f"<id {i} beyond the tokenizer>"
    return tokenizer.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")


def format_candidates(candidates: list[tuple[int, str, float]]) -> str:
    width = max(len(str(i)) for i, _, _ in candidates)
    return "\n".join(f"{rank:>3}. {i:>{width}}  {p:7.2%}  {s!r}" for rank, (i, s, p) in enumerate(candidates, 1))


# --- entry point --------------------------------------------------------------------------------------------


def run(args: GenerateArgs) -> str:
    """Load, prompt, generate (or list candidates); returns what the command prints."""
    device = resolve_device(args.device)
    model, info = load_model(args.ckpt_path, args.base, args.max_new_tokens)
    tokenizer = build_tokenizer(info.tokenizer)
    prompt = build_prompt(info.prompt_template, args.prompt, args.instruction, args.input, args.raw)
    chosen = decode_precision(args.precision, device)
    print(precision_note(args.precision, chosen, device), file=sys.stderr)
    model = prepare_for_decoding(model, chosen, device)
    if args.show_top is not None:
        return format_candidates(top_candidates(model, tokenizer, prompt, args.show_top))
    text = generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                         args.seed, args.use_cache)
    return prompt + text if args.echo else text


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        print(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
