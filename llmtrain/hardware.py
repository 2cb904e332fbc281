"""What the machine can do, and the settings that follow from it: CUDA in use, bf16 support, the precision
`trainer.precision=auto` stands for."""

from __future__ import annotations

import torch


def on_cuda(accelerator: str) -> bool:
    """Whether a run with this trainer.accelerator trains on CUDA GPUs."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def cuda_bf16() -> bool:
    """Native bf16 on the current GPU (Ampere and newer); emulation on older GPUs does not count."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested: str | int, accelerator: str) -> str | int:
    """trainer.precision as Lightning takes it: `auto` is bf16-mixed on GPUs with native bf16, else 32-true."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if on_cuda(accelerator) and cuda_bf16() else "32-true"


def allow_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls (Ampere and newer GPUs): ~8x the fp32 rate at a 10-bit mantissa."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
