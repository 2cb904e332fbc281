"""Optimizer policy: which parameters go in which group, the warmup + cosine schedule, and Muon.

The optimizer itself comes from the config as a partial (`conf/optimizer/`); the LightningModule calls it on
`param_groups(model)` and wraps it in the schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmtrain.training.hardware import native_bf16

ROLES = ("matrix", "embedding", "head", "scalar")


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float,
              cooldown_fraction: float | None = None) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_ratio of the peak at max_steps. With a
    cooldown_fraction (warmup-stable-decay): the peak held after the warmup, then a linear decay to min_ratio over
    that share of max_steps at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    if cooldown_fraction is not None:
        cooldown = max(1, round(cooldown_fraction * max_steps))
        left = max_steps - step  # steps before the end, this one included
        return 1.0 if left > cooldown else min_ratio + (1.0 - min_ratio) * left / cooldown
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def role_of(name: str, param: torch.Tensor) -> str:
    """matrix: a 2-D weight inside a transformer block; embedding: token and position tables (and a head tied to
    them); head: an untied LM or classifier head; scalar: LayerNorm gains and biases."""
    if param.dim() < 2:
        return "scalar"
    if "blocks." in name:
        return "matrix"
    return "head" if name.split(".")[-2] == "head" or ".head." in name else "embedding"


def param_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters in one group per role (named, so that the LR monitor names the curves).

    Weight decay applies to matrices (blocks, embeddings, head), not to gains and biases: the scalar group has
    weight_decay 0, the others take the optimizer's. A tied head is its embedding and appears once, in the
    embedding group, which is then marked tied_to_head (MuonAdamW trains it at the head's rate).
    """
    groups: dict[str, list[torch.Tensor]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            groups[role_of(name, p)].append(p)
    heads = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if role_of(name, p) == "head"}
    tied = any(id(p) in heads for p in groups["embedding"])
    return [{"params": params, "name": role} | ({"weight_decay": 0.0} if role == "scalar" else {})
            | ({"tied_to_head": True} if role == "embedding" and tied else {})
            for role, params in groups.items() if params]


def orthogonalize(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz iterations towards the nearest semi-orthogonal matrix of g (rows x cols), computed in
    `dtype`: the quintic iteration of torch.optim.Muon (and Keller Jordan's Muon), which maps every singular
    value into roughly (0.5, 1.5) rather than exactly 1."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller square
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T  # (r, r), r = min(rows, cols)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


def closure_loss(closure) -> torch.Tensor | None:
    """The loss that an optimizer's step closure returns, computed with gradients on (torch's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, state and update) whose Newton-Schulz iterations run in bf16 only
    where bf16 matmuls are native: torch's always casts to bf16, which on a CPU without bf16 units made Muon's
    step cost more than the rest of a small model's optimizer step."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        dtypes: dict[torch.device, torch.dtype] = {}  # whether bf16 is native: asked once per device and step
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                if p.device not in dtypes:
                    dtypes[p.device] = torch.bfloat16 if native_bf16(p.device) else torch.float32
                dtype = dtypes[p.device]
                update = orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


def lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix lr factor, as torch.optim.Muon names them: "original" (Keller Jordan's,
    sqrt(max(1, rows / cols))) or "match_rms_adamw" (0.2 sqrt(max(rows, cols)), Moonshot's)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024: momentum orthogonalised by Newton-Schulz iterations) for the matrices inside
    the blocks, AdamW for the embeddings, the head, gains and biases, each role with its own lr.

    One optimizer for Lightning, the schedule and checkpoints: its param_groups are those of a Muon (above) and a
    torch.optim.AdamW that do the steps, and the three share one state dict.
    """

    def __init__(self, params: list[dict], *, lr: float, momentum: float, nesterov: bool, ns_steps: int,
                 weight_decay: float, adjust_lr_fn: str | None, embedding_lr: float, head_lr: float,
                 scalar_lr: float, adamw_betas: tuple[float, float], adamw_eps: float,
                 adamw_weight_decay: float) -> None:
        lrs = {"embedding": embedding_lr, "head": head_lr, "scalar": scalar_lr}
        # a token table that is also the head (tied) is trained as a head: its gradient is dense, from every
        # position's logits, where an untied table's rows move only where their token occurs
        role = {id(g): "head" if g.get("tied_to_head") else g["name"] for g in params}
        muon = [dict(g, optimizer="muon") for g in params if g["name"] == "matrix"]
        adamw = [dict(g, optimizer="adamw", lr=lrs[role[id(g)]]) for g in params if g["name"] != "matrix"]
        self._muon = Muon(muon, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn) if muon else None
        self._adamw = torch.optim.AdamW(adamw, betas=tuple(adamw_betas), eps=adamw_eps,
                                        weight_decay=adamw_weight_decay) if adamw else None
        parts = [o for o in (self._muon, self._adamw) if o is not None]
        super().__init__([g for o in parts for g in o.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        """Point the two inner optimizers at this optimizer's groups and state (after init and after a load)."""
        for inner, kind in ((self._muon, "muon"), (self._adamw, "adamw")):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss
