"""The machine a benchmark ran on, in the words every figure must carry: the CPU's model and whether it computes
bf16 natively (avx512_bf16 or amx_bf16). Imported by the scripts beside it (`python benchmarks/<script>.py` puts this
folder on the import path)."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
    bf16 = "native bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", text) else "no native bf16"
    return f"{model} ({bf16})"
