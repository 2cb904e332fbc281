"""Text in, text out: encode a prompt, continue it with the GPT, decode what it added. Shared by the validation
samples in TensorBoard, the instruct stage's test answers and `python -m llmtrain.generate`."""

from __future__ import annotations

import torch

from llmtrain.data.tokenizer import ENDOFTEXT, bos_prefix, continuation_text, with_bos
from llmtrain.model.gpt import GPT
from llmtrain.stages.base import evaluating


def encode_prompt(gpt: GPT, tokenizer, prompt: str) -> torch.Tensor:
    """prompt -> token ids (1, T) on the model's device; an empty prompt starts from <|endoftext|>, as GPT-2's
    unconditional samples do; a prompt longer than the context keeps its last context_length tokens. A tokenizer
    that starts every text with a begin-of-text token (Llama's) gets it first, once, also when the prompt is cut."""
    bos = bos_prefix(tokenizer)
    body = with_bos(tokenizer, tokenizer.encode(prompt, allowed_special={ENDOFTEXT}))[len(bos):]
    body = body or ([] if bos else [tokenizer.eot_token])
    ids = bos + body[-(gpt.config.context_length - len(bos)):]
    return torch.tensor([ids], dtype=torch.long, device=next(gpt.parameters()).device)


@torch.no_grad()
def generate_text(gpt: GPT, tokenizer, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int = 1234,
                  use_cache: bool = True) -> str:
    """The continuation of prompt (not the prompt itself), up to max_new_tokens tokens, cut at <|endoftext|>
    (past the context the window slides). The model runs in eval mode and is left in the mode it was in."""
    idx = encode_prompt(gpt, tokenizer, prompt)  # (1, T)
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    with evaluating(gpt):
        out = gpt.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           eos_id=tokenizer.eot_token, use_cache=use_cache, generator=generator)  # (1, T + n)
    return continuation_text(tokenizer, out[0, idx.size(1):].tolist())
