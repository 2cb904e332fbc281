"""python -m llmtrain.chat: a conversation rendered by the model's chat template, answers that stop at its end of
turn, the history trimmed to the context, /reset and /system; in a real pseudo-terminal and from standard input."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, subprocess_env

from llmtrain.chat import ChatArgs, Conversation, parse_args, run
from llmtrain.data.chat_template import CHATML, ChatTemplate, chat_tokenizer
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig

TOKENIZER = chat_tokenizer("bytes", "chatml")  # bytes + <|im_start|>, <|im_end|>


def chat_checkpoint(path, favour: int | None = None, context: int = 128):
    """A chat stage's checkpoint of a GPT with the ChatML bytes tokenizer; `favour`: the id the head makes the
    likeliest after every position (greedy answers are that token, again and again)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=259, context_length=context, emb_dim=16, n_heads=2, n_layers=1))
    if favour is not None:  # the final norm gives ones whatever the input; the head reads them into `favour`
        with torch.no_grad():
            model.ln_f.weight.zero_()
            model.ln_f.bias.fill_(1.0)
            model.head.weight.zero_()
            model.head.weight[favour] = 1.0
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": TOKENIZER, "stage": "chat",
                             "chat_template": CHATML}}, path)
    return path


def args(ckpt, **keys) -> ChatArgs:
    return parse_args([f"ckpt_path={ckpt}", "temperature=0", "device=cpu", "precision=fp32",
                       *(f"{k}={v}" for k, v in keys.items())])


def test_an_answer_stops_at_the_end_of_turn_and_joins_the_history(tmp_path):
    tok = build_tokenizer(TOKENIZER)
    end_of_turn = tok.encode("<|im_end|>", allowed_special="all")[0]
    out = io.StringIO()
    ckpt = chat_checkpoint(tmp_path / "eot.ckpt", favour=end_of_turn)
    conversation = run(args(ckpt, max_new_tokens=20), iter(["Hello", "/reset", "again"]), out)
    assert out.getvalue() == "\n\n"  # the end of turn came first: empty answers, nothing past it
    assert conversation.turns == [{"role": "user", "content": "again"}, {"role": "assistant", "content": ""}]
    out = io.StringIO()
    ckpt = chat_checkpoint(tmp_path / "a.ckpt", favour=ord("a"))
    assert run(args(ckpt, max_new_tokens=5), iter(["Hello", "/system Be brief."]), out).system == "Be brief."
    assert out.getvalue() == "aaaaa\n"  # no end of turn: max_new_tokens of them


def test_the_history_is_rendered_by_the_template_and_trimmed_to_the_context():
    template = ChatTemplate(CHATML, build_tokenizer(TOKENIZER))
    conversation = Conversation(template, "Be brief.")
    conversation.turns = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "one"},
                          {"role": "user", "content": "second"}]
    full = template.encode(template.render(conversation.messages(conversation.turns), add_generation_prompt=True))
    assert conversation.prompt_ids(1000) == full
    trimmed = template.tok.decode(conversation.prompt_ids(len(full) - 1))
    assert trimmed == template.render(conversation.messages(conversation.turns[2:]), add_generation_prompt=True)
    assert trimmed.endswith("<|im_start|>assistant\n")
    conversation.reset()
    assert conversation.turns == [] and conversation.system == "Be brief."
    conversation.reset(None, keep_system=False)
    assert conversation.messages([]) == []


def test_bad_values_are_one_line():
    with pytest.raises(UserError, match="max_new_tokens must be at least 1, got 0"):
        parse_args(["ckpt_path=x", "max_new_tokens=0"])
    with pytest.raises(UserError, match="precision='fp8' is not known"):
        parse_args(["ckpt_path=x", "precision=fp8"])
    assert parse_args(["ckpt_path=x", "--stdin"]).stdin


def read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    """What the pseudo-terminal shows until `marker` appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; seen: {seen[-500:]!r}")
        seen += os.read(fd, 4096)
    return seen


@pytest.mark.slow
def test_a_conversation_in_a_real_terminal_and_from_standard_input(tmp_path):
    ckpt = chat_checkpoint(tmp_path / "a.ckpt", favour=ord("a"))
    command = [sys.executable, "-m", "llmtrain.chat", f"ckpt_path={ckpt}", "temperature=0", "max_new_tokens=3",
               "precision=fp32"]
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path,
                               env=subprocess_env() | {"TERM": "dumb"}, close_fds=True)
    os.close(follower)
    try:
        assert b"/reset, /system" in read_until(leader, b"> ")
        os.write(leader, b"Hello there\n")
        assert b"aaa" in read_until(leader, b"> ")  # the answer, streamed, then the next prompt
        os.write(leader, b"/system Be brief.\n")
        assert b"system message set" in read_until(leader, b"> ")
        os.write(leader, b"/reset\n")
        assert b"starts over" in read_until(leader, b"> ")
        os.write(leader, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(leader)
    piped = subprocess.run([*command, "--stdin"], input="Hi\n/reset\nAgain\n", capture_output=True, text=True,
                           cwd=tmp_path, env=subprocess_env(), timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout == "aaa\naaa\n" and "> " not in piped.stdout
    bad = subprocess.run([*command, "ckpt_path=/nonexistent"], capture_output=True, text=True, cwd=ROOT,
                         env=subprocess_env(), timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ckpt_path=")
