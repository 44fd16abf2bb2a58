"""The trainer side's total result parser: what a program wrote and what its server saw -> a result.

:func:`interpret` maps any input to an :class:`ExecutionResult` (it never raises because of what
a program did), reads a bounded number of bounded lines, accepts only plain JSON and lets the
server's observation (timeout, signal, exit status) win over the lines. :mod:`.client` calls it
on the bytes it collected from the result pipe and on the server's report.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterable
from typing import Any

from fp16rl.sandbox.common import (
    EXIT_OK,
    EXIT_SETUP_FAILED,
    ExecutionResult,
    Grid,
    Outcome,
    SandboxLimits,
    clean_text,
)
from fp16rl.sandbox.grids import check_grid

_MEMORY_KILL_FRACTION = 0.8  # a crash at >= this share of memory_mb counts as MEMORY_LIMIT

_PROGRAM_KINDS = {  # lines without "i": the whole program failed before any grid ran
    "parse_error": Outcome.PARSE_ERROR,
    "exception": Outcome.EXCEPTION,
    "memory_limit": Outcome.MEMORY_LIMIT,
    "setup_error": Outcome.EXCEPTION,
}
_GRID_KINDS = {
    "exception": Outcome.EXCEPTION,
    "memory_limit": Outcome.MEMORY_LIMIT,
    "invalid_output": Outcome.INVALID_OUTPUT,
}


def interpret(header: Any, payload: bytes, n: int, limits: SandboxLimits, *,
              oversize: bool = False) -> ExecutionResult:
    """Turn the server's report and the child's bytes into a result; total, trusts nothing.

    * The server's observation wins: unless the child exited with status 0 by itself, the
      outcome is the timeout, signal or exit status, whatever lines it wrote (a program can
      write well-formed lines for every grid and then hang, crash or exit 3).
    * At most ``2 n + 8`` lines of at most a grid's worth of bytes are parsed, so a flood of
      empty or nested lines costs the trainer next to nothing; longer lines are skipped.
    * Only exact JSON types count; a field of the wrong type makes its line malformed.
    * With a clean exit, the outcome is that of the first failure in grid order (grids run in
      order, so this is also the first in time); an unreported grid is a failure.

    Error texts are cut and stripped of control characters. Any exception inside (there should
    be none; a fuzz test checks) still becomes an EXCEPTION result.
    """
    try:
        return _interpret(header, payload, n, limits, oversize)
    except Exception as exc:  # noqa: BLE001 - the parser must never stop a training run
        return ExecutionResult(Outcome.EXCEPTION, [None] * n, f"unreadable result ({type(exc).__name__})")


def _interpret(header: Any, payload: bytes, n: int, limits: SandboxLimits, oversize: bool) -> ExecutionResult:
    """:func:`interpret` without the safety net (the fuzz test calls this one)."""
    outputs: list[Grid | None] = [None] * n
    failures: dict[int, tuple[Outcome, str]] = {}
    reported = [False] * n
    program_failure: tuple[Outcome, str] | None = None
    for message in _messages(payload, 2 * n + 8, _line_cap(limits.max_grid_side)):
        kind = message.get("kind")
        kind = kind if type(kind) is str else None
        error = clean_text(message.get("error"))
        index = message.get("i", None)
        if index is None:
            if kind in _PROGRAM_KINDS:
                prefix = "sandbox setup failed: " if kind == "setup_error" else ""
                program_failure = (_PROGRAM_KINDS[kind], prefix + error)
                break
            continue
        if type(index) is not int or not 0 <= index < n or reported[index]:
            continue
        reported[index] = True
        if "grid" in message:
            grid, reason = check_grid(message["grid"], limits.max_grid_side)
            if grid is None:
                failures[index] = (Outcome.INVALID_OUTPUT, f"grid {index}: {reason}")
            outputs[index] = grid
        elif kind in _GRID_KINDS:
            failures[index] = (_GRID_KINDS[kind], f"grid {index}: {error}")
        else:
            failures[index] = (Outcome.EXCEPTION, f"grid {index}: malformed result")
    process = _process_failure(header, limits, oversize, program_failure)
    if process is not None:
        return ExecutionResult(process[0], outputs, clean_text(process[1]))
    if program_failure is not None:
        return ExecutionResult(program_failure[0], [None] * n, clean_text(program_failure[1]))
    if not all(reported):
        first = reported.index(False)
        failures.setdefault(first, (Outcome.EXCEPTION, f"program exited without reporting grid {first}"))
    if failures:
        outcome, error = failures[min(failures)]
        return ExecutionResult(outcome, outputs, clean_text(error))
    return ExecutionResult(Outcome.OK, outputs)


def _line_cap(max_side: int) -> int:
    """Bytes of the longest line an honest child writes: a full grid, or an escaped error."""
    return 2 * (max_side + 2) * max_side + 4096


def _messages(payload: bytes, max_lines: int, line_cap: int) -> Iterable[dict[str, Any]]:
    """The JSON objects among the first max_lines complete lines (an unterminated last piece
    is incomplete); lines over line_cap bytes and anything that is not an object are skipped."""
    start = 0
    max_brackets = line_cap // 16  # an honest line opens a few dozen; deep nesting is slow to reject
    for _ in range(max_lines):
        end = payload.find(b"\n", start)
        if end < 0:
            return
        line = payload[start:end]
        start = end + 1
        if not line or len(line) > line_cap or line.count(b"[") + line.count(b"{") > max_brackets:
            continue
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if type(message) is dict:
            yield message


def _process_failure(header: Any, limits: SandboxLimits, oversize: bool,
                     program_failure: tuple[Outcome, str] | None) -> tuple[Outcome, str] | None:
    """What the server (or the trainer) observed, unless the child exited cleanly (None)."""
    if oversize:
        return Outcome.INVALID_OUTPUT, f"result larger than {limits.max_output_bytes} bytes"
    if type(header) is not dict:
        return Outcome.EXCEPTION, "sandbox worker broke protocol (report)"
    status = header.get("status")
    if status == "exited":
        code = header.get("code")
        if code == EXIT_OK and type(code) is int:
            return None
        if code == EXIT_SETUP_FAILED and program_failure is not None and program_failure[1].startswith("sandbox setup"):
            return program_failure
        shown = code if type(code) is int else "?"
        return Outcome.EXCEPTION, f"program exited (code {shown}) without a valid result"
    if status == "timeout":
        return Outcome.TIMEOUT, f"timeout after {limits.timeout_s}s"
    if status == "killed":  # the trainer asked for it after reading past the cap
        return Outcome.INVALID_OUTPUT, f"result larger than {limits.max_output_bytes} bytes"
    if status == "fork_failed":
        return Outcome.EXCEPTION, f"sandbox could not start the program: {clean_text(header.get('error'))}"
    if status != "signaled":
        return Outcome.EXCEPTION, "sandbox worker broke protocol (status)"
    number, cpu_s, maxrss_kb = header.get("signal"), header.get("cpu_s"), header.get("maxrss_kb")
    if type(number) is not int or not (_finite(cpu_s) and _finite(maxrss_kb)):
        return Outcome.EXCEPTION, "sandbox worker broke protocol (status)"
    name = _signal_name(number)
    if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_s >= limits.cpu_limit()):
        return Outcome.TIMEOUT, f"CPU time limit of {limits.cpu_limit()}s exceeded ({name})"
    peak_mb = maxrss_kb / 1024
    # SIGKILL nobody asked for (kill is blocked) is the OOM killer; a crash near the cap is
    # an allocation failure that C code did not turn into MemoryError.
    if number == signal.SIGKILL or peak_mb >= _MEMORY_KILL_FRACTION * limits.memory_mb:
        return Outcome.MEMORY_LIMIT, f"killed by {name} at {peak_mb:.0f} MB peak RSS (limit {limits.memory_mb} MB)"
    return Outcome.EXCEPTION, f"killed by {name}"


def _finite(value: Any) -> bool:
    """A JSON number (not a bool) that fits a float and is finite."""
    if type(value) is int:
        return abs(value) < 2**53
    return type(value) is float and math.isfinite(value)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
