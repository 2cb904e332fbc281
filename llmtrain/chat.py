"""Talk to a chat model: python -m llmtrain.chat ckpt_path=outputs/runs/<a finetune=chat run>

A conversation in the terminal: each line you type is a user message; the model's answer streams as it is
generated and stops at the template's end-of-turn token. The whole history goes to the model each turn, rendered
by the chat template the model was trained with (the checkpoint's, else its tokenizer's, else ChatML; or
`chat_template=`); when it outgrows the context, the oldest turns are left out (the system message stays).

    /reset           forget the conversation (the system message stays)
    /system <text>   set the system message and start over (/system alone: none)
    /quit or Ctrl-D  leave

`--stdin` (or `stdin=true`) reads the user's lines from standard input without prompts and prints one answer per
line read, for scripts: `printf 'Define kiss.\\nAnd tree?\\n' | python -m llmtrain.chat ckpt_path=... --stdin`.
ckpt_path takes what `python -m llmtrain.generate` takes; the other keys are listed by `--help`.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from llmtrain.arguments import parse
from llmtrain.data.chat_template import ChatTemplate, model_template
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError, one_line_errors
from llmtrain.generate import load_model
from llmtrain.model.gpt import GPT, KVCache, sample_next
from llmtrain.run.decoding import PRECISIONS, decode_precision, precision_note, prepare_for_decoding, resolve_device
from llmtrain.stages.base import evaluating


@dataclass
class ChatArgs:
    """The command line's keys (`--help` shows these comments)."""

    ckpt_path: str = MISSING  # a chat model: an llmtrain .ckpt, run dir or export, a Hugging Face folder, an adapter
    base: str | None = None  # base model of a LoRA adapter dir, when llmtrain_adapter.json does not name it
    chat_template: str | None = None  # null: the model's own; chatml | alpaca | a Jinja file | a tokenizer_config.json
    system: str | None = None  # the system message the conversation starts with
    max_new_tokens: int = 256  # per answer
    temperature: float = 0.7  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 1234
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | int8, as for generate
    stdin: bool = False  # read the user's lines from standard input, no prompts (also: --stdin)


def parse_args(argv: list[str]) -> ChatArgs:
    args = parse(ChatArgs, ["stdin=true" if a == "--stdin" else a for a in argv])
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        problems.append(f"temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.precision not in PRECISIONS:
        problems.append(f"precision={args.precision!r} is not known: choose one of {', '.join(PRECISIONS)}")
    if problems:
        raise UserError("; ".join(problems))
    return args


class Conversation:
    """The history, rendered by the template into the ids of the next answer's prompt."""

    def __init__(self, template: ChatTemplate, system: str | None) -> None:
        self.template, self.system, self.turns = template, system, []

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        self.turns = []
        if not keep_system:
            self.system = system

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_ids(self, room: int) -> list[int]:
        """The ids of the history with the generation prompt, at most `room` of them: the oldest exchanges left out
        first, then (a single message too long) its beginning."""
        turns = self.turns
        while True:
            ids = self.template.encode(self.template.render(self.messages(turns), add_generation_prompt=True))
            if len(ids) <= room or len(turns) <= 1:
                return ids[-room:]
            turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop the oldest user-assistant exchange


@torch.inference_mode()
def stream(model: GPT, ids: list[int], max_new_tokens: int, stop: set[int], temperature: float, top_k: int | None,
           top_p: float | None, generator: torch.Generator) -> Iterator[int]:
    """New token ids, one at a time as they are sampled (KV cache), up to a stop id (not yielded)."""
    device = next(model.parameters()).device
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device, model.tok_emb.weight.dtype)
    step = torch.tensor([ids], device=device)  # (1, T): the prompt once, then the newest token
    for _ in range(max_new_tokens):
        logits = model.head(model.hidden(step, cache)[:, -1, :])  # (1, V)
        token = int(sample_next(logits, temperature, top_k or None, top_p, generator)[0, 0])
        if token in stop:
            return
        yield token
        step = torch.tensor([[token]], device=device)


def answer(model: GPT, tok, conversation: Conversation, args: ChatArgs, stop: set[int], out) -> str:
    """Generate the assistant's next turn, writing its text to `out` as it comes; it joins the history."""
    room = model.config.context_length - args.max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens={args.max_new_tokens} leaves no room for the conversation in the model's "
                        f"context of {model.config.context_length}: lower it")
    ids = conversation.prompt_ids(room)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    decoder, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    with evaluating(model):
        for token in stream(model, ids, args.max_new_tokens, stop, args.temperature, args.top_k, args.top_p,
                            generator):
            if token >= tok.n_vocab:  # an id of a padded vocabulary that no text has
                continue
            piece = decoder.decode(tok.decode_single_token_bytes(token))
            text.append(piece)
            out.write(piece)
            out.flush()
    text.append(decoder.decode(b"", final=True))
    out.write(text[-1] + "\n")
    out.flush()
    reply = "".join(text).strip()
    conversation.turns.append({"role": "assistant", "content": reply})
    return reply


def run(args: ChatArgs, lines: Iterator[str] | None = None, out=sys.stdout) -> Conversation:
    """The conversation loop; `lines` are the user's (default: the terminal, or standard input with stdin=true).
    Returns the conversation as it stands at the end."""
    device = resolve_device(args.device)
    model, info = load_model(args.ckpt_path, args.base, args.max_new_tokens)
    tok = build_tokenizer(info.tokenizer)
    template = ChatTemplate(model_template(args.chat_template, info.tokenizer, info.chat_template), tok)
    stop = {template.end_of_turn(), tok.eot_token}
    chosen = decode_precision(args.precision, device)
    print(precision_note(args.precision, chosen, device), file=sys.stderr)
    model = prepare_for_decoding(model, chosen, device)
    conversation = Conversation(template, args.system)
    interactive = lines is None and not args.stdin and sys.stdin.isatty()
    if lines is None:
        lines = _terminal_lines() if interactive else (line.rstrip("\n") for line in sys.stdin)
    if interactive:
        print(f"chatting with {info.path} (/reset, /system <text>, /quit or Ctrl-D to leave)", file=sys.stderr)
    for line in lines:
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            conversation.reset()
            print("(the conversation starts over)", file=sys.stderr)
        elif line.startswith("/system"):
            conversation.reset(line[len("/system"):].strip() or None, keep_system=False)
            print(f"(system message {'set' if conversation.system else 'removed'}; the conversation starts over)",
                  file=sys.stderr)
        elif line.strip():
            conversation.turns.append({"role": "user", "content": line})
            answer(model, tok, conversation, args, stop, out)
    return conversation


def _terminal_lines() -> Iterator[str]:
    """The user's lines typed at a `> ` prompt (readline editing where Python has it), until Ctrl-D."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
