"""What the machine can do, and the settings that follow from it: CUDA in use, native bf16 on the GPU or the
CPU, the precision `trainer.precision=auto` stands for."""

from __future__ import annotations

import os
import platform
from functools import cache

import torch
from omegaconf import DictConfig

# CPU features that make bf16 arithmetic native (not emulated): x86 AVX512-BF16 or AMX tiles, Arm BF16
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
# For tests only: LLMTRAIN_CPU_BF16=1 (or 0) makes this CPU look as if it had native bf16 (or not), so that the whole
# suite can be run as on either kind of CPU (docs/testing.md). bf16 then runs emulated where the CPU lacks it.
CPU_BF16_ENV = "LLMTRAIN_CPU_BF16"


def on_cuda(accelerator: str) -> bool:
    """Whether a run with this trainer.accelerator trains on CUDA GPUs."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def cuda_bf16() -> bool:
    """Native bf16 on the current GPU (Ampere and newer); emulation on older GPUs does not count."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty elsewhere."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_features() -> list[str]:
    """What gives this CPU native bf16: its feature flags among CPU_BF16_FLAGS, or the test switch CPU_BF16_ENV."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return [f"{CPU_BF16_ENV}=1"] if forced == "1" else []
    return sorted(CPU_BF16_FLAGS & cpu_flags())


def cpu_bf16() -> bool:
    """Native bf16 on this CPU: bf16 autocast then runs its matmuls at up to twice the fp32 rate or more."""
    return bool(cpu_bf16_features())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native on this device; where they are emulated they run many times slower
    than fp32 (a CPU without AVX512-BF16 or AMX: ~6 against ~100 GFLOP/s on the 2-core CPU of our figures)."""
    return cuda_bf16() if device.type == "cuda" else device.type == "cpu" and cpu_bf16()


def choose_precision(requested: str | int, accelerator: str) -> tuple[str | int, str]:
    """(trainer.precision as Lightning takes it, why). `auto` is bf16-mixed where the device has native bf16
    (Ampere and newer GPUs; CPUs with AVX512-BF16, AMX or Arm BF16) and 32-true elsewhere."""
    if requested != "auto":
        return requested, "as set by trainer.precision"
    if on_cuda(accelerator):
        if cuda_bf16():
            return "bf16-mixed", f"auto: {torch.cuda.get_device_name()} has native bf16"
        return "32-true", f"auto: {torch.cuda.get_device_name()} has no native bf16"
    if cpu_bf16():
        return "bf16-mixed", f"auto: this CPU has native bf16 ({', '.join(cpu_bf16_features())})"
    return "32-true", "auto: this CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag)"


def fused_optimizer(accelerator: str) -> bool:
    """Whether torch's fused optimizer kernels (one kernel for the whole AdamW update) run where this trains:
    CUDA and CPU have them."""
    if on_cuda(accelerator):
        return True
    return str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.backends.mps.is_available())


def allow_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls (Ampere and newer GPUs): ~8x the fp32 rate at a 10-bit mantissa."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def hardware_problems(trainer: DictConfig) -> list[str]:
    """Devices and precisions this machine cannot train with."""
    problems = []
    accelerator = str(trainer.accelerator)
    n_gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and n_gpus == 0:
        problems.append(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: "
                        f"use trainer.accelerator=cpu (or auto)")
    elif (accelerator in ("gpu", "cuda", "auto") and n_gpus and isinstance(trainer.devices, int)
          and trainer.devices > n_gpus):
        problems.append(f"trainer.devices={trainer.devices} but this machine has {n_gpus} GPUs: "
                        f"set trainer.devices={n_gpus} or fewer")
    precision = str(trainer.precision)
    if precision.startswith("16") and not on_cuda(accelerator):
        problems.append(f"trainer.precision={precision} needs a CUDA GPU (fp16 on CPU gives NaN losses or silently "
                        f"becomes bf16): use trainer.precision=bf16-mixed or 32-true")
    if precision.startswith("bf16") and on_cuda(accelerator) and not cuda_bf16():
        problems.append(f"trainer.precision={precision} but {torch.cuda.get_device_name()} has no bf16 support "
                        f"(it needs an Ampere or newer GPU): use trainer.precision=16-mixed or 32-true")
    return problems


SHARDING = ("FSDPStrategy", "ModelParallelStrategy")  # Lightning's strategies that shard the weights across ranks


def is_sharded(strategy) -> bool:
    """Whether a strategy shards the weights across ranks (FSDP through either of Lightning's strategies). It takes
    what the run has at hand: the strategy object of a trainer, its config node (a `_target_`), or the name that
    trainer.strategy takes ("fsdp", "fsdp_cpu_offload", "ddp", ...)."""
    if isinstance(strategy, (dict, DictConfig)):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1] in SHARDING
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")
    return any(cls.__name__ in SHARDING for cls in type(strategy).__mro__)
