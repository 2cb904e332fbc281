"""The parts a transformer block is made of, for GPT-2 and for the Llama family: norms, rotary positions, attention
with fewer key/value heads, the MLP with or without a gate. model.py builds them from a GPTConfig.

Torch only, and no config object: each layer takes the numbers it needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019): LayerNorm without centring and bias. Computed in
    float32, as Llama's reference does, so that bf16 activations are normalised at full precision."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """kind "layernorm" (GPT-2; its bias only with bias=True) or "rmsnorm" (Llama; never a bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


# rope_scaling's types and the numbers each reads
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling) -> tuple[dict, list[str]]:
    """(scaling as rope_frequencies reads it: float factors, an int context; what keeps it from being one, a phrase
    each naming rope_scaling.<key>)."""
    types = " or ".join(ROPE_SCALING)
    if not isinstance(scaling, Mapping) or scaling.get("type") not in ROPE_SCALING:
        found = f"type={scaling.get('type')!r}" if isinstance(scaling, Mapping) else repr(scaling)
        return scaling, [f"rope_scaling has {found}: give null or a mapping with type {types} (and its numbers, "
                         f"e.g. model.rope_scaling={{type:linear,factor:2}})"]
    kind, reads = scaling["type"], ROPE_SCALING[scaling["type"]]
    problems = [f"rope_scaling.{k} is not read by {kind} scaling: drop it (it reads {', '.join(reads)})"
                for k in scaling if k not in ("type", *reads)]
    problems += [f"rope_scaling.{k} is missing: {kind} scaling reads {', '.join(reads)}" for k in reads
                 if k not in scaling]
    problems += [f"rope_scaling.{k} must be a positive number, got {scaling[k]!r}" for k in reads if k in scaling
                 and (isinstance(scaling[k], bool) or not isinstance(scaling[k], (int, float)) or scaling[k] <= 0)]
    if not problems and kind == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        problems.append(f"rope_scaling.low_freq_factor={scaling['low_freq_factor']} must be below "
                        f"high_freq_factor={scaling['high_freq_factor']} (Llama 3.1: 1 and 4)")
    if problems:
        return scaling, problems
    return {"type": kind, **{k: int(scaling[k]) if k == "original_max_position_embeddings" else float(scaling[k])
                             for k in reads}}, []


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The angle per position of each pair of a head (head_dim/2,), float32: theta^(-2i / head_dim), then rescaled.

    scaling None: plain RoPE. {"type": "linear", "factor": f}: every frequency / f (positions interpolated: a
    context f times longer; Chen et al., 2023). {"type": "llama3", ...}: Llama 3.1's rule, by wavelength
    (2 pi / frequency) against the pretraining context L = original_max_position_embeddings: pairs that turn more
    than high_freq_factor times over L keep their frequency, pairs that turn fewer than low_freq_factor times are
    divided by factor, and those between blend the two linearly in L / wavelength.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hs/2,)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    context, low, high = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                          scaling["high_freq_factor"])
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)  # 0 at the slow end of the band, 1 at the fast end
    between = (1 - blend) * inv_freq / factor + blend * inv_freq
    slowed = torch.where(wavelength > context / low, inv_freq / factor, between)
    return torch.where(wavelength < context / high, inv_freq, slowed)


def rope_angles(head_dim: int, theta: float, positions: torch.Tensor, device,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32, of rotary position embeddings (RoPE, Su et al., 2021) for positions (T,): (T,
    head_dim), or (B, T) (packed rows): (B, 1, T, head_dim); `scaling` as rope_frequencies takes it.

    Dimension i of a head is paired with i + head_dim/2 (the half-split layout of Hugging Face's Llama, so that
    its q and k weights load unpermuted); the pair turns by position * rope_frequencies(...)[i].
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)  # (hs/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hs)
    if angles.dim() == 3:  # one row of positions per sequence: broadcast over the heads
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def packed_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments (B, T), the record of each position of packed rows -> (positions (B, T), counted from the start of
    each record; attention mask (B, 1, T, T), True where a query may attend: causal, within its own record)."""
    pos = torch.arange(segments.size(1), device=segments.device).expand_as(segments)  # (B, T)
    first = torch.ones_like(segments, dtype=torch.bool)  # where a record starts
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    pos = pos - torch.where(first, pos, 0).cummax(dim=1).values
    return pos, (segments[:, :, None] == segments[:, None, :]).tril()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x_i, x_{i+hs/2}) of x (B, h, T, hs) by its angle: x cos + rotate_half(x) sin, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal attention with n_heads query heads and n_kv_heads key/value heads (GQA, Ainslie et al., 2023): each
    key/value head serves n_heads / n_kv_heads query heads, so that the KV cache shrinks by that factor. One linear
    layer makes q, k and v; `rope` (cos, sin) rotates q and k by their positions (None: positions came with x).

    Heads are head_dim wide (None: emb_dim / n_heads); with another width, q, k and v project to heads x head_dim
    and out_proj back to emb_dim (Qwen3). qk_norm_eps: an RMSNorm with this epsilon over each head's query and key,
    before RoPE (QK-norm, Qwen3); None: none."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool, bias: bool,
                 drop_rate: float, head_dim: int | None = None, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim or emb_dim // n_heads
        q_dim, kv_dim = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.qkv = nn.Linear(emb_dim, q_dim + 2 * kv_dim, bias=qkv_bias)  # rows: q, then k, then v
        self.out_proj = nn.Linear(q_dim, emb_dim, bias=bias)
        if qk_norm_eps is not None:  # one gain per dimension of a head, shared by the heads
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, qk_norm_eps), RMSNorm(self.head_dim, qk_norm_eps)
        self.drop_rate = drop_rate
        self.resid_drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None,
                layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache (model.KVCache), keys and values of earlier positions come from
        it and this call's are added to it. mask (B, 1, T, T), True where a query may attend (packed records):
        in place of the causal mask."""
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # the cache then keeps rotated keys
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal = mask is None
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nkv, past + T, hs)
            if past and T > 1:  # new queries see all the past and the causal part of themselves
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                is_causal = False
            elif past:  # one new query sees everything
                is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.drop_rate if self.training else 0.0, is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,  # query head h reads key/value head h // (nh / nkv)
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, q_dim)
        return self.resid_drop(self.out_proj(y))


class MLP(nn.Module):
    """kind "gelu": GPT-2's fc2(gelu(fc1(x))). kind "swiglu": Llama's gated fc2(silu(gate(x)) * fc1(x)) (Shazeer,
    2020), whose three matrices at a hidden size of 8/3 * emb_dim cost what GPT-2's two at 4 * emb_dim do."""

    def __init__(self, emb_dim: int, hidden: int, kind: str, bias: bool, drop_rate: float) -> None:
        super().__init__()
        if kind == "swiglu":
            self.gate = nn.Linear(emb_dim, hidden, bias=bias)
        self.fc1 = nn.Linear(emb_dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, emb_dim, bias=bias)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate"):
            return self.drop(self.fc2(F.silu(self.gate(x)) * self.fc1(x)))
        # GPT-2 used the tanh approximation of GELU; keep it so that its weights give its outputs
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))
