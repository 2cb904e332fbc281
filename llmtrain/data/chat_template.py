"""Chat templates, rendered as transformers renders them, and the assistant-only labels read off the rendering.

A template is Jinja, as in a model's tokenizer_config.json (`chat_template`). It is rendered in the sandboxed
environment transformers uses (`ImmutableSandboxedEnvironment`, trim_blocks and lstrip_blocks on, the loopcontrols
extension, the globals raise_exception and strftime_now, a tojson that does not escape HTML) with the tokenizer's
special tokens as variables (bos_token, eos_token), and the text is encoded with special tokens recognised and no
post-processor (transformers' apply_chat_template(tokenize=True) passes add_special_tokens=False): the same ids.

`data.chat_template` chooses it: null (the chat_template of the tokenizer_config.json beside a tokenizer.json,
else chatml), `chatml`, `alpaca`, or a file (a Jinja template, or a tokenizer_config.json holding one).

Which tokens train: the assistant turn i of a conversation is what the model writes after the generation prompt,
so its characters are those between the rendering of messages[:i] with add_generation_prompt and the rendering of
messages[:i + 1] (trailing whitespace dropped: its end-of-turn token included, the line break after it not). Both
renderings must be prefixes of the whole conversation's, which the templates of chat models are.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmtrain.data.added_tokens import missing_tokens
from llmtrain.data.tokenizer import ENDOFTEXT, build_tokenizer, is_file_tokenizer, tokenizer_path, with_added
from llmtrain.errors import UserError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Alpaca (Taori et al., 2023) for conversations: the system message replaces the preamble; each answer ends with eos.
ALPACA = ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% else %}{{ 'Below is an "
          "instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
          "{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + "
          "message['content'] + '\n\n### Response:\n' }}{% elif message['role'] == 'assistant' %}{{ "
          "message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}")
BUILT_IN = {"chatml": CHATML, "alpaca": ALPACA}
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # <|im_start|>, <|eot_id|>: the spelling of special tokens in templates
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise UserError(f"data.chat_template is not a valid Jinja template ({e}): fix it or choose chatml") from e


def model_template(choice: str | None, tokenizer: str, own: str | None) -> str:
    """The template to talk to a trained model with: `choice` (a chat_template= key) when given, else the one its
    checkpoint or export carries (`own`), else the one template_source picks for its tokenizer."""
    return own if choice is None and own else template_source(choice, tokenizer)


def template_source(choice: str | None, tokenizer: str) -> str:
    """The Jinja source that data.chat_template chooses for `tokenizer` (see the module docstring)."""
    if choice is None:
        if is_file_tokenizer(tokenizer):
            config = tokenizer_path(tokenizer).parent / "tokenizer_config.json"
            if config.is_file() and isinstance(found := json.loads(config.read_text()).get("chat_template"), str):
                return found
        return CHATML
    if choice in BUILT_IN:
        return BUILT_IN[choice]
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(f"data.chat_template={choice!r} is neither {', '.join(BUILT_IN)}, null, nor a file: "
                        f"name a Jinja template file or a tokenizer_config.json with a chat_template")
    text = path.read_text()
    if path.suffix == ".json":
        found = json.loads(text).get("chat_template")
        if not isinstance(found, str):
            raise UserError(f"data.chat_template={choice!r} has no \"chat_template\" string: name another file")
        return found
    return text


def special_tokens(tok) -> dict[str, str]:
    """The special tokens a template sees as variables, as transformers passes them (special_tokens_map)."""
    eos = tok.decode([tok.eot_token])
    bos_id = getattr(tok, "bos_token", None)
    return {"eos_token": eos, "bos_token": tok.decode([bos_id]) if isinstance(bos_id, int) else eos}


def needed_tokens(source: str) -> list[str]:
    """The special tokens a template writes literally (<|...|>), in order of appearance, eos/end-of-text aside."""
    return [t for t in dict.fromkeys(SPECIAL.findall(source)) if t != ENDOFTEXT]


def chat_tokenizer(tokenizer: str, choice: str | None) -> str:
    """The name of `tokenizer` with the special tokens that the chosen template writes and it lacks added."""
    needed = needed_tokens(template_source(choice, tokenizer))
    return with_added(tokenizer, missing_tokens(build_tokenizer(tokenizer), needed))


class ChatTemplate:
    """A template and the tokenizer it renders for."""

    def __init__(self, source: str, tok) -> None:
        self.source, self.tok, self.template = source, tok, compile_template(source)
        self.variables = special_tokens(tok)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except jinja2.TemplateError as e:
            raise UserError(f"data.chat_template failed on a conversation: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, allowed_special="all")

    def end_of_turn(self) -> int:
        """The id that ends an assistant turn: the last token of a rendered answer (<|im_end|>, <|eot_id|>, eos)."""
        start, end = self.assistant_spans(PROBE)[0]
        return self.encode(self.render(PROBE)[start:end])[-1]

    def assistant_spans(self, messages: list[dict]) -> list[tuple[int, int]]:
        """(start, end) character offsets of each assistant turn in render(messages), end-of-turn token included."""
        full, spans = self.render(messages), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1]).rstrip()
            if not (full.startswith(prompt) and full.startswith(turn) and len(prompt) < len(turn)):
                raise UserError("data.chat_template renders a conversation's beginning differently from the whole "
                                "conversation (its turns are not prefixes): the assistant turns cannot be found; "
                                "choose another template (data.chat_template=chatml)")
            spans.append((len(prompt), len(turn)))
        return spans

    def encode_conversation(self, messages: list[dict], max_length: int, last_turn_only: bool = False
                            ) -> tuple[list[int], list[int], list[bool]]:
        """(input_ids, labels, assistant) of a conversation, at most max_length each: labels are the next ids,
        `assistant` whether that next token belongs to an assistant turn (the last one only: DPO's answer)."""
        text = self.render(messages)
        ids = self.encode(text)[: max_length + 1]
        turns = self.assistant_spans(messages)[-1:] if last_turn_only else self.assistant_spans(messages)
        spans = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in turns]
        assistant, k = [], 0
        for start in byte_starts(self.tok, ids, text.encode()):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            assistant.append(k < len(spans) and spans[k][0] <= start)
        return ids[:-1], ids[1:], assistant[1:]


def byte_starts(tok, ids: list[int], text: bytes) -> list[int]:
    """The byte offset in `text` where each token starts (its tokens must spell the text's bytes)."""
    pieces = [tok.decode_single_token_bytes(i) for i in ids]
    if b"".join(pieces) != text[: sum(map(len, pieces))]:
        raise UserError("the tokenizer's tokens do not spell the rendered conversation byte for byte (a normalizer "
                        "changes the text): assistant tokens cannot be located; use a byte-level BPE tokenizer")
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    return starts
