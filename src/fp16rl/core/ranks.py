"""What a launcher (torchrun, accelerate launch) told this process about its rank, read from the
environment without importing torch: the CLI decides who prints before torch loads."""

from __future__ import annotations

import os


def launched_ranks() -> int:
    """The world size a launcher declared in ``WORLD_SIZE``; 1 when none did."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that prints errors and progress."""
    return os.environ.get("RANK", "0") in ("", "0")


def cpus_per_rank() -> int:
    """The CPUs this process may use, shared among the ranks on its machine (``LOCAL_WORLD_SIZE``)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, available // max(local, 1))
