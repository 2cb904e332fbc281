"""Growing a GPT's vocabulary: rows for the special tokens a chat template adds to its tokenizer."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from llmtrain.model.gpt import GPT


def grow_vocab(model: GPT, vocab_size: int) -> None:
    """Give the embedding and the LM head rows up to `vocab_size`, each new row the mean of the existing ones, so
    that a new token starts as an average token rather than a random one (Hewitt, 2021, "Initializing new word
    embeddings for pretrained language models"). A tied head stays tied."""
    old = model.config.vocab_size
    if vocab_size <= old:
        raise ValueError(f"can only grow the vocabulary beyond {old} ids, got {vocab_size}")
    tied = model.tied

    def grown(weight: torch.Tensor) -> nn.Parameter:  # (old, C) -> (vocab_size, C)
        mean = weight.detach().mean(dim=0, keepdim=True)
        return nn.Parameter(torch.cat([weight.detach(), mean.expand(vocab_size - old, -1)]).contiguous())

    model.tok_emb.weight = grown(model.tok_emb.weight)
    model.tok_emb.num_embeddings = vocab_size
    model.head.weight = model.tok_emb.weight if tied else grown(model.head.weight)
    model.head.out_features = vocab_size
    model.config = replace(model.config, vocab_size=vocab_size)
