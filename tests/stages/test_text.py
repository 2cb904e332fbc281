"""Text in, text out: the prompt's ids, and generate_text's continuation, mode and seed."""

import torch

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.text import encode_prompt, generate_text

TOK = build_tokenizer("bytes")


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(vocab_size=257, context_length=8, emb_dim=16, n_heads=2, n_layers=1) | kw)))


def always_x() -> GPT:
    """A tiny GPT whose every next token is 'x'."""
    model = tiny_gpt(context_length=32).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[ord("x")] = 100.0
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
    return model


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens():
    ids = encode_prompt(tiny_gpt(), TOK, "abcdefghijkl")  # 12 bytes, a context of 8
    assert ids.tolist() == [TOK.encode("efghijkl")]


def test_an_empty_prompt_starts_from_end_of_text():
    assert encode_prompt(tiny_gpt(), TOK, "").tolist() == [[TOK.eot_token]]


def test_the_continuation_leaves_the_prompt_out():
    assert generate_text(always_x(), TOK, "ab", max_new_tokens=3, temperature=0) == "xxx"


def test_generation_runs_without_dropout_and_gives_the_model_back_in_its_mode():
    """A model in training mode (dropout 0.5) continues greedily as in eval mode, and is still training after."""
    model = tiny_gpt(drop_rate=0.5, context_length=32)
    expected = generate_text(model.eval(), TOK, "The cat", max_new_tokens=16, temperature=0)
    model.train()
    assert generate_text(model, TOK, "The cat", max_new_tokens=16, temperature=0) == expected
    assert model.training


def test_the_seed_decides_the_sample():
    model = tiny_gpt(context_length=32)
    sample = lambda seed: generate_text(model, TOK, "Once", max_new_tokens=12, temperature=1.0, top_k=None,  # noqa: E731
                                        seed=seed)
    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) == 4  # an untrained byte model is close to uniform over 257 ids
