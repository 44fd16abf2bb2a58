"""How fast this machine computes in half precision, measured, so a slow run is explained up front.

Many CPUs have no native float16 (and some no bfloat16) matmul: torch then converts to float32
and back inside the kernel, which can be several times slower than float32 itself. A user who
runs ``--dtype float16`` on such a CPU deserves one line saying so before a step takes minutes.
"""

from __future__ import annotations

import platform
import statistics
import time
from functools import lru_cache

import torch

EMULATED_SLOWDOWN = 2.0  # half precision this much slower than float32 is not a native kernel


@lru_cache(maxsize=8)
def matmul_slowdown(dtype: torch.dtype, size: int = 256, repeats: int = 5) -> float:
    """Median time of a ``size``-cubed matmul in ``dtype`` over the same in float32, on the CPU."""

    def median_time(kind: torch.dtype) -> float:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(kind)
        b = torch.randn(size, size, generator=generator).to(kind)
        a @ b  # warm-up: first calls pick kernels and allocate
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_time(dtype) / max(median_time(torch.float32), 1e-9)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for messages and results."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emulation_notes(dtypes: set[torch.dtype], device: torch.device) -> list[str]:
    """One line per half dtype this CPU computes far slower than float32 (none on GPUs)."""
    if device.type != "cpu":
        return []
    notes = []
    for dtype in sorted(dtypes - {torch.float32}, key=str):
        slowdown = matmul_slowdown(dtype)
        if slowdown >= EMULATED_SLOWDOWN:
            name = str(dtype).removeprefix("torch.")
            notes.append(f"{name} matmul on this CPU ({cpu_name()}) is {slowdown:.1f}x slower than float32 "
                         f"(a measured 256x256 matmul): it is emulated, not native, so steps will be slow; "
                         "a GPU computes it natively")
    return notes
