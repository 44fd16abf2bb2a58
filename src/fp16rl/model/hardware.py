"""This machine as the run sees it: half-precision speed (measured, so a slow run is explained up
front), CPU threads, the allocator setting.

Many CPUs have no native float16 (and some no bfloat16) matmul: torch then converts to float32
and back inside the kernel, element by element, far slower than float32 itself. fp16rl's linear
layers compute such a dtype widened to float32 (``half_matmul``); a user who runs ``--dtype float16``
on such a CPU still deserves one line saying so, and what remains slow.
"""

from __future__ import annotations

from importlib import metadata
import os
import platform
import statistics
import time
from functools import lru_cache

import torch

from fp16rl.model.half_matmul import emulated_dtypes, half_matmul_path

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
    """One line per half dtype this CPU has no fast matmul kernel for (none on GPUs): widened by
    ``half_matmul`` in the linear layers, or else measured far slower than float32."""
    if device.type != "cpu":
        return []
    notes = []
    for dtype in sorted(dtypes - {torch.float32}, key=str):
        name = str(dtype).removeprefix("torch.")
        if dtype in emulated_dtypes():
            notes.append(f"{name} matmul has no kernel on this CPU ({cpu_name()}): the linear layers of both engines "
                         f"widen it to float32 and round once to {name}, as the kernel would (fp16rl.model.half_matmul); "
                         "attention and elementwise ops stay emulated, so steps are slower than in float32")
            continue
        slowdown = matmul_slowdown(dtype)
        if slowdown >= EMULATED_SLOWDOWN:
            notes.append(f"{name} matmul on this CPU ({cpu_name()}) is {slowdown:.1f}x slower than float32 "
                         f"(a measured 256x256 matmul): it is emulated, not native, so steps will be slow; "
                         "a GPU computes it natively")
    return notes


def auto_threads(device: torch.device) -> int:
    """CPU threads for torch's intra-op pool: the current setting (torch's default: every core, or
    what ``OMP_NUM_THREADS``/torchrun set), capped at this rank's share of the cores and less the
    cores other processes keep busy at the start (the 1-minute load average).

    Why: OpenMP threads wait for each other at every op; when another job holds one of the cores, a
    thread that cannot run stalls all the others. Measured on a 2-core AMD EPYC with SmolLM2-135M
    decoding 8 rows in fp32 (bench/RESULTS.md, "Threads"): 2 threads take 59 ms/token on an idle
    machine and 211 ms with one core busy; 1 thread 77 ms either way.
    """
    from fp16rl.core.ranks import cpus_per_rank

    current = torch.get_num_threads()
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return current
    return max(1, min(current, cpus_per_rank(), idle_cores(current)))


def idle_cores(fallback: int = 1) -> int:
    """The machine's cores less those other processes keep busy now (the rounded 1-minute load average);
    ``fallback`` cores where the load is unknown."""
    if not hasattr(os, "getloadavg"):
        return fallback
    return (os.cpu_count() or fallback) - round(os.getloadavg()[0])


def resolve_threads(requested: int, recorded: int | None, device: torch.device) -> tuple[int, str | None]:
    """The intra-op thread count of a run on the CPU, and a warning line or None.

    The count changes the order of floating-point sums, so a CPU run is bitwise reproducible only at one
    count. It is resolved once per run and recorded (config.yaml ``cpu_threads``): ``requested`` (``--threads``)
    when set, else the ``recorded`` count of the run being resumed, else ``auto_threads`` (which follows the
    load at the start, and so could differ on a resume). An explicit count other than the recorded one is
    the user's choice and is used, with a warning that the resume is then not bitwise exact.
    """
    if requested > 0:
        if recorded is not None and requested != recorded:
            return requested, (f"--threads {requested} differs from the {recorded} CPU threads this run used before "
                               "its resume: the sums run in another order, so from here the run is not bitwise "
                               f"the uninterrupted one (leave --threads out, or pass {recorded}, for an exact resume)")
        return requested, None
    if recorded is not None:
        return recorded, None
    return auto_threads(device), None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    Why: by default glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
    ``mmap`` and returns it with ``munmap`` when freed, so each training step pays page faults again
    on its large tensors: the tied embedding's ``[vocab, hidden]`` gradient, the weight gradients.
    Measured on SmolLM2-135M full fine-tuning in fp32 (2-core AMD EPYC, bench/RESULTS.md): the
    training phase 4.3 -> 3.3 s a step. The same is why Intel advises jemalloc or tcmalloc for PyTorch
    on CPUs. The process's resident memory then stays at its peak. Only with glibc on Linux, and not
    when the user set ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` (their choice stands);
    returns whether it applied.
    """
    if platform.system() != "Linux" or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def library_versions() -> dict[str, str]:
    """Versions of what computed the numbers, recorded with every run and probe."""
    import platform
    import sys

    import peft
    import torch
    import transformers

    versions = {"fp16rl": metadata.version("fp16rl"), "torch": str(torch.__version__), "transformers": transformers.__version__,
                "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "torch_threads": str(torch.get_num_threads()), "cpu_half_matmul": half_matmul_path()}
    if sys.modules.get("bitsandbytes") is not None:  # None: skipped (``fp16rl.cli.common.skip_bitsandbytes``)
        versions["bitsandbytes"] = sys.modules["bitsandbytes"].__version__
    return versions
