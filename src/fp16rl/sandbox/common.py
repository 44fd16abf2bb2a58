"""Types and constants shared by the trainer side (:mod:`.client`) and the fork server.

Kept free of numpy and of anything stateful: the fork server imports it before it forks programs,
and every program inherits it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

Grid = list[list[int]]

# Isolation layers beyond the always-on rlimits, in the order config.yaml reports them.
OPTIONAL_LAYERS = (
    "privilege_drop",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
    "mount_namespace",
    "landlock",
    "seccomp",
)
DISABLE_ENV = "FP16RL_SANDBOX_DISABLE"
ACTIVE = "active"
DISABLED = f"disabled ({DISABLE_ENV} or Sandbox(disable=...))"

ERROR_CHARS = 300  # error strings are cut to this many characters

# Exit statuses of a program's child process that the sandbox itself chooses.
EXIT_OK = 0
EXIT_SETUP_FAILED = 71  # a layer failed to apply: the program never ran
EXIT_SERVER_GONE = 72  # the fork server died before the child could tie its life to it
EXIT_CHANNEL_BROKEN = 73  # the result pipe was closed or broken (by the program)


class Outcome(str, enum.Enum):
    """How one program run ended; only ``OK`` earns a reward."""

    OK = "ok"
    PARSE_ERROR = "parse_error"
    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    INVALID_OUTPUT = "invalid_output"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program resource limits (the original used 1 s and 4096 MB)."""

    timeout_s: float = 1.0  # wall clock for the whole program (all grids)
    memory_mb: int = 4096  # RLIMIT_AS of the child
    cpu_s: int | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    max_output_bytes: int = 1_000_000  # cap on the serialized result the child sends back
    max_grid_side: int = 30

    def cpu_limit(self) -> int:
        """RLIMIT_CPU in seconds: a backstop behind the wall-clock limit."""
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass
class ExecutionResult:
    """One program on a list of grids: overall outcome plus every grid it did produce."""

    outcome: Outcome
    outputs: list[Grid | None]  # one per input, in order; None where that grid failed
    error: str | None = None
    duration_s: float = 0.0


def clean_text(value: Any, limit: int = ERROR_CHARS) -> str:
    """A printable, single-line, bounded copy of a string a program controls ("" otherwise).

    Error messages end up in terminals, logs and sample files: control characters (ANSI
    escapes, carriage returns, bells, NULs, C1 controls), format characters (bidirectional
    overrides, zero-width marks), unassigned or surrogate code points and line separators are
    replaced by ``?`` (``str.isprintable`` is false for exactly the Unicode categories "Other"
    and "Separator" except the space) so that nobody's screen or log parser sees them.
    """
    if type(value) is not str:
        return ""
    text = value[:limit]
    return text if text.isprintable() else "".join(ch if ch.isprintable() else "?" for ch in text)
