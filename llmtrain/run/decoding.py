"""A model made ready for decoding: its device, and its weights' format (fp32, bf16, or int8 weight-only).

Decoding one sequence reads every weight once per new token, so its speed is set by how many bytes the
weights take, not by arithmetic. Each linear layer keeps its weight as int8, one scale per output row
(symmetric, round to nearest), and multiplies with torch's int8 weight-only kernel (bf16 activations, as
gpt-fast does); embeddings, LayerNorms and everything else stay in fp32. The logits move by about 1% of
their spread, so sampled text is as good, but greedy tokens can differ from fp32's: decode in fp32 where the
exact tokens matter.
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.errors import UserError
from llmtrain.training.hardware import cuda_bf16

INT8_KERNEL = "_weight_int8pack_mm"
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def int8_available() -> bool:
    """Whether this torch build has the int8 weight-only matmul (CPU and CUDA builds since torch 2.3)."""
    return hasattr(torch.ops.aten, INT8_KERNEL)


class Int8Linear(nn.Module):
    """nn.Linear with its weight stored as int8 rows and a bf16 scale per row: y = (x @ q.T) * scale + b."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)  # (N, out)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of model (in place) by an Int8Linear; a head tied to the embedding gets an int8
    copy of the table and the embedding stays fp32. For inference only: the quantized layers do not train."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return model.eval()


def decode_precision(precision: str, device: torch.device) -> str:
    """The weights' format for decoding. auto: int8 weight-only on a CPU (decoding one sequence is bound by
    reading the weights: a quarter of fp32's bytes), bf16 on a GPU with native bf16, fp32 elsewhere. fp32 gives
    exactly the tokens of the trained weights (and of transformers' generate on the same weights)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_bf16() else "fp32"
    return "int8" if device.type == "cpu" and int8_available() else "fp32"


def precision_note(requested: str, chosen: str, device: torch.device) -> str:
    """The one line a decoding command prints on stderr: the weights' format, why, and how to get exact tokens."""
    why = f"precision={requested}" + (f" on this {device.type.upper()}" if requested == "auto" else "")
    if chosen == "fp32":
        return f"decoding in fp32 ({why}): the exact tokens of the trained weights"
    what = "int8 weight-only weights" if chosen == "int8" else "bf16 weights"
    return (f"decoding with {what} ({why}, faster than fp32): greedy tokens can differ from the fp32 model's; "
            "precision=fp32 gives its exact tokens")


def prepare_for_decoding(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """model on device with its weights in the decode precision (fp32 | bf16 | int8)."""
    if precision == "int8" and not int8_available():
        raise UserError("precision=int8: this torch build has no int8 weight-only matmul: use precision=fp32")
    model = model.to(device)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    return quantize_int8(model) if precision == "int8" else model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: no CUDA device is available here: use device=cpu (or device=auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps: MPS is not available here: use device=cpu (or device=auto)")
    return torch.device(device)
