"""A GPT in plain PyTorch, written to be read: GPT-2 (Radford et al., 2019) by default, the Llama family's choices
as options (GPTConfig): rotary positions (scaled as Llama 3's), grouped-query attention, RMSNorm, a SwiGLU MLP, no
biases; Qwen2's q/k/v biases, Qwen3's QK-norm and heads of their own width.

token embedding (+ learned positions) -> n_layers x [pre-norm attention, pre-norm MLP] -> final norm -> linear head.

The layers themselves are in layers.py. These two files import torch only. They know nothing of training, configs,
LoRA or checkpoints; `forward` returns logits and the loss lives with the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from llmtrain.model.layers import MLP, CausalSelfAttention, check_rope_scaling, make_norm, rope_angles

CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu")}
SIZES = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "n_kv_heads", "head_dim", "mlp_hidden")


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence: the rows of a learned position table, or the RoPE positions used
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0  # embedding, attention-weight and residual dropout
    qkv_bias: bool = False  # a bias on q, k, v: GPT-2's released weights and Qwen2's (without `bias`) have one
    tie_weights: bool = False  # share the token embedding with the output head (GPT-2 does)
    pos_emb: str = "learned"  # learned (a table of context_length rows) | rope (no weights: rotations of q and k)
    rope_theta: float = 10000.0  # RoPE's base: pair i of a head turns by position * rope_theta^(-2i / head_dim)
    rope_scaling: dict | None = None  # None | {type: linear, factor} | {type: llama3, factor, low_freq_factor,
    #                                   high_freq_factor, original_max_position_embeddings}: rope_frequencies
    n_kv_heads: int | None = None  # key/value heads: n_heads is multi-head, 1 multi-query, between: GQA; None: n_heads
    head_dim: int | None = None  # the width of a head; None: emb_dim / n_heads (Qwen3 sets its own, e.g. 128)
    norm: str = "layernorm"  # layernorm | rmsnorm (no centring, no bias: Llama's)
    qk_norm: bool = False  # an RMSNorm (norm_eps) over each head's queries and keys, before RoPE (Qwen3)
    norm_eps: float = 1e-5  # added to the variance in every norm (GPT-2, SmolLM: 1e-5; LlamaConfig's default: 1e-6)
    mlp: str = "gelu"  # gelu: fc2(gelu(fc1 x)) | swiglu: fc2(silu(gate x) * fc1 x)
    mlp_hidden: int | None = None  # None: 4 * emb_dim (gelu), 8/3 * emb_dim up to a multiple of 64 (swiglu: as costly)
    bias: bool = True  # biases of the attention output, the MLP and LayerNorm (GPT-2 has them, Llama not)

    def __post_init__(self) -> None:
        wrong = [(n, v) for n in SIZES if (v := getattr(self, n)) is not None and (type(v) is not int or v < 1)]
        problems = [f"model.{n} must be a positive integer, got {v}" for n, v in wrong]
        if any(type(v) is not int for _, v in wrong):
            raise ValueError("; ".join(problems))  # the checks below compute with them
        for name in ("rope_theta", "norm_eps"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is None:  # derived values are stored, so that a saved config says what was built
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.emb_dim if self.mlp == "gelu" else 64 * math.ceil(8 * self.emb_dim / 3 / 64)
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                problems.append(f"model.{name}={getattr(self, name)!r} is not known: choose {' or '.join(choices)}")
        if self.head_dim is None and self.n_heads >= 1 and self.emb_dim % self.n_heads:
            near = _nearest_divisor(self.emb_dim, self.n_heads)
            problems.append(
                f"model.emb_dim={self.emb_dim} is not divisible by model.n_heads={self.n_heads}: "
                f"choose n_heads among the divisors of emb_dim (e.g. model.n_heads={near}), or set model.head_dim"
            )
        elif self.head_dim is None and self.n_heads >= 1:
            self.head_dim = self.emb_dim // self.n_heads
        if self.pos_emb == "rope" and (self.head_dim or 0) >= 1 and self.head_dim % 2:
            problems.append(f"model.pos_emb=rope turns pairs of dimensions, but a head has head_dim={self.head_dim} "
                            f"dimensions, an odd number: change model.head_dim (or model.emb_dim / model.n_heads)")
        if self.rope_scaling is not None and self.pos_emb != "rope":
            problems.append(f"model.rope_scaling rescales rotary positions, but model.pos_emb={self.pos_emb}: set "
                            "model.pos_emb=rope, or model.rope_scaling=null")
        elif self.rope_scaling is not None:
            self.rope_scaling, scaling_problems = check_rope_scaling(self.rope_scaling)
            problems += [f"model.{p}" for p in scaling_problems]
        if self.n_kv_heads >= 1 and self.n_heads >= 1 and self.n_heads % self.n_kv_heads:
            near = _nearest_divisor(self.n_heads, self.n_kv_heads)
            problems.append(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}: each key/value "
                f"head serves a group of query heads; choose a divisor of n_heads (e.g. model.n_kv_heads={near})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"model.drop_rate must lie in [0, 1), got {self.drop_rate}")
        if problems:
            raise ValueError("; ".join(problems))


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


class KVCache:
    """Keys and values of every layer for the positions seen so far, so that each new token costs one position.

    Tensors are allocated once, (B, n_kv_heads, max_len, head_dim) per layer, and filled in place: with GQA the
    cache holds only the key/value heads, n_heads / n_kv_heads times less memory than multi-head attention.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = 0  # number of positions already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at the current position; return all keys and values so far."""
        T = k.size(2)
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = config
        self.ln1 = make_norm(c.norm, c.emb_dim, c.norm_eps, c.bias)
        self.attn = CausalSelfAttention(c.emb_dim, c.n_heads, c.n_kv_heads, c.qkv_bias, c.bias, c.drop_rate,
                                        c.head_dim, c.norm_eps if c.qk_norm else None)
        self.ln2 = make_norm(c.norm, c.emb_dim, c.norm_eps, c.bias)
        self.mlp = MLP(c.emb_dim, c.mlp_hidden, c.mlp, c.bias, c.drop_rate)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope, cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        # RoPE models have no position table: positions are rotations inside attention
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = make_norm(config.norm, config.emb_dim, config.norm_eps, config.bias)
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

    @property
    def tied(self) -> bool:
        """Whether the LM head shares the token embedding's weight (tie_weights=true, until replace_head gives the
        model a head of its own): one tensor, trained, counted and saved once."""
        return self.head.weight is self.tok_emb.weight

    def replace_head(self, num_classes: int) -> None:
        """Turn the LM into a classifier: a new linear head to num_classes logits (untied from the embedding,
        GPT-2's init). The classify stage reads its logits at the last real token of each sequence.

        The head has no bias, as GPT-2's own classifier (transformers' GPT2ForSequenceClassification.score) has
        none, so that the model exports to it unchanged; the final LayerNorm's shift, which only the head reads,
        can play a bias's part when it trains."""
        head = nn.Linear(self.config.emb_dim, num_classes, bias=False).to(self.tok_emb.weight)  # its device, dtype
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        self.head = head

    def crop_context(self, context_length: int) -> None:
        """Keep the first context_length rows of the position table (nanoGPT's crop_block_size); RoPE: lower the
        limit."""
        if not 1 <= context_length <= self.config.context_length:
            raise ValueError(f"can only crop to 1..{self.config.context_length} positions, got {context_length}")
        self.config = replace(self.config, context_length=context_length)
        if self.pos_emb is None:
            return
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
        return n - self.pos_emb.weight.numel() if exclude_embeddings and self.pos_emb is not None else n

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size); with a cache, positions continue from cache.pos."""
        return self.head(self.hidden(idx, cache))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final hidden states (B, T, emb_dim), after the last norm: what the head reads.

        A loss over a large vocabulary can apply the head in chunks of these instead of building all logits."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model's context_length={self.config.context_length}"
            )
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        c = self.config
        rope = rope_angles(c.head_dim, c.rope_theta, start, T, idx.device, c.rope_scaling) if c.pos_emb == "rope" \
            else None
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
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
