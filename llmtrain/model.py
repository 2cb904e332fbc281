"""A GPT in plain PyTorch: the architecture of GPT-2 (Radford et al., 2019), written to be read.

token + position embeddings -> n_layers x [pre-LN attention, pre-LN MLP] -> final LayerNorm -> linear head.

This file imports torch only. It knows nothing of training, configs, LoRA or checkpoints;
`forward` returns logits and the loss lives with the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence the position table covers
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0  # embedding, attention-weight and residual dropout
    qkv_bias: bool = False  # GPT-2's released weights have one; many reimplementations drop it
    tie_weights: bool = False  # share the token embedding with the output head (GPT-2 does)

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                problems.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_heads >= 1 and self.emb_dim % self.n_heads:
            near = _nearest_divisor(self.emb_dim, self.n_heads)
            problems.append(
                f"model.emb_dim={self.emb_dim} is not divisible by model.n_heads={self.n_heads}: "
                f"choose n_heads among the divisors of emb_dim (e.g. model.n_heads={near})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"model.drop_rate must lie in [0, 1), got {self.drop_rate}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


class KVCache:
    """Keys and values of every layer for the positions seen so far, so that each new token costs one position.

    Tensors are allocated once, (B, n_heads, max_len, head_dim) per layer, and filled in place.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.n_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = 0  # number of positions already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at the current position; return all keys and values so far."""
        T = k.size(2)
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.drop_rate = config.drop_rate
        self.resid_drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, True
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
            if past and T > 1:  # new queries see all the past and the causal part of themselves
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                is_causal = False
            elif past:  # one new query sees everything
                is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.drop_rate if self.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.fc2 = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; keep it so that its weights give its outputs
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.emb_dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.emb_dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim)
        self.head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self.apply(self._init_weights)
        # GPT-2 section 2.3: scale the weights of residual projections by 1/sqrt(N), N = 2 per block (attn + mlp)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def replace_head(self, num_classes: int) -> None:
        """Turn the LM into a classifier: a new linear head to num_classes logits (untied from the embedding,
        GPT-2's init). The classify stage reads its logits at the last real token of each sequence.

        The head has no bias, as GPT-2's own classifier (transformers' GPT2ForSequenceClassification.score) has
        none, so that the model exports to it unchanged; the final LayerNorm's shift, which only the head reads,
        can play a bias's part when it trains."""
        head = nn.Linear(self.config.emb_dim, num_classes, bias=False, device=self.tok_emb.weight.device)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        self.head = head

    def crop_context(self, context_length: int) -> None:
        """Keep the first context_length rows of the position table (nanoGPT's crop_block_size)."""
        if not 1 <= context_length <= self.config.context_length:
            raise ValueError(f"can only crop to 1..{self.config.context_length} positions, got {context_length}")
        self.config = replace(self.config, context_length=context_length)
        self.pos_emb.weight = nn.Parameter(self.pos_emb.weight[:context_length].detach().clone())
        self.pos_emb.num_embeddings = context_length

    def set_drop_rate(self, drop_rate: float) -> None:
        """Every dropout of the model (embedding, attention weights, residual branches) at drop_rate."""
        self.config = replace(self.config, drop_rate=drop_rate)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = drop_rate
            elif isinstance(module, CausalSelfAttention):
                module.drop_rate = drop_rate

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head is not counted twice)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, context_length: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight (Kaplan et al., 2020) plus attention's
        12 * n_layers * emb_dim * T (PaLM, appendix B). Position embeddings do no multiplications."""
        T = context_length or self.config.context_length
        n = self.num_params(exclude_embeddings=True)  # a tied embedding counts once: as the head's matmul
        if self.head.weight is not self.tok_emb.weight:
            n -= self.tok_emb.weight.numel()  # an untied embedding is a lookup, no FLOPs
        return 6.0 * n + 12.0 * self.config.n_layers * self.config.emb_dim * T

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size); with a cache, positions continue from cache.pos."""
        return self.head(self.hidden(idx, cache))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final hidden states (B, T, emb_dim), after the last LayerNorm: what the head reads.

        A loss over a large vocabulary can apply the head in chunks of these instead of building all logits."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model's context_length={self.config.context_length}"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        temperature 0 is greedy decoding. top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p (nucleus sampling, Holtzman et al., 2019). Stops early once every row has
        produced eos_id; rows that finished earlier are padded with eos_id. With the KV cache, the prompt is
        read once (only its last position goes through the head) and each new token costs one position.
        """
        B, T = idx.shape
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        cache = None
        if use_cache and T + max_new_tokens <= self.config.context_length:
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.tok_emb.weight.dtype)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        n = T
        for _ in range(max_new_tokens):
            if cache is None:  # re-read the (cropped) context each step
                step_input = out[:, max(0, n - self.config.context_length) : n]
            else:  # the prompt once, then the newest token
                step_input = out[:, cache.pos : n]
            logits = self.head(self.hidden(step_input, cache)[:, -1, :])  # (B, V): the last position only
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                next_id = torch.where(done[:, None], torch.full_like(next_id, eos_id), next_id)
                done |= next_id[:, 0] == eos_id
            out[:, n] = next_id[:, 0]
            n += 1
            if eos_id is not None and bool(done.all()):
                break
        return out[:, :n]


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep tokens until the mass before them reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
