"""The parts a transformer block is made of, for GPT-2 and for the Llama family: norms, rotary positions, attention
with fewer key/value heads, the MLP with or without a gate. model.py builds them from a GPTConfig.

Torch only, and no config object: each layer takes the numbers it needs.
"""

from __future__ import annotations

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


def rope_angles(head_dim: int, theta: float, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim), float32, of rotary position embeddings (RoPE, Su et al., 2021) for positions
    start .. start+T-1.

    Dimension i of a head is paired with i + head_dim/2 (the half-split layout of Hugging Face's Llama, so that
    its q and k weights load unpermuted); the pair turns by position * theta^(-2i / head_dim).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(start, start + T, device=device).float(), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x_i, x_{i+hs/2}) of x (B, h, T, hs) by its angle: x cos + rotate_half(x) sin, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal attention with n_heads query heads and n_kv_heads key/value heads (GQA, Ainslie et al., 2023): each
    key/value head serves n_heads / n_kv_heads query heads, so that the KV cache shrinks by that factor. One linear
    layer makes q, k and v; `rope` (cos, sin) rotates q and k by their positions (None: positions came with x)."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool, bias: bool,
                 drop_rate: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, emb_dim // n_heads
        kv_dim = n_kv_heads * self.head_dim
        self.qkv = nn.Linear(emb_dim, emb_dim + 2 * kv_dim, bias=qkv_bias)  # rows: q, then k, then v
        self.out_proj = nn.Linear(emb_dim, emb_dim, bias=bias)
        self.drop_rate = drop_rate
        self.resid_drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None,
                layer: int = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache (model.KVCache), keys and values of earlier positions come from
        it and this call's are added to it."""
        B, T, C = x.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if rope is not None:  # the cache then keeps rotated keys
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, is_causal = None, True
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
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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
