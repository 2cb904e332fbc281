"""What MFU divides: the FLOPs a training step really does per token, and the peak FLOP/s of the device.

FLOPs per token, counted from parameters (so that other layer shapes, e.g. grouped-query attention or a gated
MLP, are counted right without a formula per architecture): a weight that multiplies does 2 FLOPs in the forward
pass; in the backward pass 4 if it trains (the gradient of its input and of itself) and 2 if it is frozen but a
gradient still passes through it (its input's only), 0 if no gradient reaches it (frozen layers below the
lowest trainable parameter: the classify stage's default). Lookups (position embeddings, an untied token
embedding) do none. Attention adds 2 x 2 x d x T per layer forward (QK^T and AV over T positions; d the heads x
head size, emb_dim unless head_dim is set apart) and twice that backward where a gradient passes (PaLM, Chowdhery
et al. 2022, appendix B: 12 x layers x d x T in all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense peak FLOP/s per device (no sparsity), from the vendor's datasheets, keyed by the exact name that
# torch.cuda.get_device_name() gives: a name that only contains a known one (an "NVIDIA L40S" is not an "NVIDIA L4")
# is not guessed. bf16 / fp16: tensor cores; tf32: fp32 matmuls on tensor cores (trainer.precision=32-true with
# perf.tf32); fp32: without them. None: the device lacks the format.
_H100_SXM = {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}
_A100 = {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}
_V100_SXM = {"bf16": None, "fp16": 125e12, "tf32": None, "fp32": 15.7e12}
_V100_PCIE = {"bf16": None, "fp16": 112e12, "tf32": None, "fp32": 14e12}
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12},
    "NVIDIA H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "NVIDIA L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "NVIDIA L40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "NVIDIA L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "NVIDIA GeForce RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla T4": {"bf16": None, "fp16": 65e12, "tf32": None, "fp32": 8.1e12},
}


def number_format(precision: str | int, tf32: bool) -> str | None:
    """The format the matmuls run in under a Lightning precision: bf16, fp16, tf32, fp32 (None: not in the table)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if precision.startswith("32"):
        return "tf32" if tf32 else "fp32"
    return None  # 64-true, fp8 / transformer-engine: no peak in the table


def peak_flops(device_name: str, precision: str | int, tf32: bool) -> float | None:
    """The dense peak of this device for this precision, or None when the device or its format is unknown."""
    peaks = PEAK_FLOPS.get(device_name)
    kind = number_format(precision, tf32)
    if peaks is None or kind is None:
        return None
    if kind == "tf32" and peaks["tf32"] is None:  # no tensor-core fp32 (V100, T4): perf.tf32 changes nothing
        kind = "fp32"
    return peaks[kind]


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training step per real token: `per_token` + `per_position` x the padded sequence length."""

    per_token: float
    per_position: float

    def of_batch(self, tokens: float, seq_len: int) -> float:
        return tokens * (self.per_token + self.per_position * seq_len)


def attention_width(config) -> int:
    """A GPTConfig's heads x head size: the width of q, and of each position's attention output (emb_dim unless
    head_dim is set apart, as Qwen3's is)."""
    return config.n_heads * config.head_dim


def training_flops(model: nn.Module, n_layers: int, width: int) -> TrainingFlops:
    """Forward + backward FLOPs per token of `model` (a GPT, or a wrapper such as peft's around one) as it trains:
    which parameters train decides the backward pass. `width`: the attention width (attention_width); the
    attention term assumes its layers are the model's n_layers blocks of equal width, each after its parameters."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    named, last_use, lowest = _gradient_reach(model)
    per_token, seen = 0.0, set()
    for _, p in named:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if all(isinstance(m, nn.Embedding) for m in owners[id(p)]):
            continue  # a lookup
        backward = 4 if p.requires_grad else 2 if last_use[id(p)] > lowest else 0
        per_token += (2 + backward) * p.numel()
    blocks = _layer_ends(named, n_layers)
    per_position = sum(4.0 * width * (1 + (2 if end > lowest else 0)) for end in blocks)
    return TrainingFlops(per_token, per_position)


def layers_with_backward(model: nn.Module, n_layers: int) -> int:
    """How many of the transformer blocks a gradient passes through (and so keep activations for the backward)."""
    named, _, lowest = _gradient_reach(model)
    return sum(end > lowest for end in _layer_ends(named, n_layers))


def _gradient_reach(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[int, int], int]:
    """(the parameters in the order the forward pass uses them, the index of each one's last use, the index of the
    first use of the lowest trainable parameter: a gradient passes through everything used after it)."""
    named = list(model.named_parameters(remove_duplicate=False))
    first_use, last_use = {}, {}  # a tied embedding is used first as the lookup, last as the head
    for i, (_, p) in enumerate(named):
        first_use.setdefault(id(p), i)
        last_use[id(p)] = i
    lowest = min((first_use[id(p)] for _, p in named if p.requires_grad), default=len(named))
    return named, last_use, lowest


def _layer_ends(named: list[tuple[str, torch.Tensor]], n_layers: int) -> list[int]:
    """For each transformer block (parameters named ...blocks.<i>....), the index of its last parameter."""
    ends: dict[int, int] = {}
    for i, (name, _) in enumerate(named):
        parts = name.split(".")
        if "blocks" in parts and parts.index("blocks") + 1 < len(parts):
            ends[int(parts[parts.index("blocks") + 1])] = i
    return [ends[b] for b in sorted(ends)][:n_layers]
