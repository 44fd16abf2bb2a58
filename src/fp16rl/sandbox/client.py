"""The trainer side: the worker pool, the per-program pipes, and the total result parser.

Per program the trainer makes two pipes, hands the child's ends to a fork server over its unix
socket, writes the request into one and reads at most ``max_output_bytes`` from the other while
waiting for the server's short report of how the child ended. Nothing here ever raises because
of what a program did: every byte it could control goes through :func:`interpret`, which maps
any input to an :class:`ExecutionResult`, reads a bounded number of bounded lines, accepts only
plain JSON and lets the server's observation (timeout, signal, exit status) win over the lines.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from fp16rl.core.ranks import cpus_per_rank
from fp16rl.sandbox.common import (
    DISABLE_ENV,
    EXIT_OK,
    EXIT_SETUP_FAILED,
    OPTIONAL_LAYERS,
    ExecutionResult,
    Grid,
    Outcome,
    SandboxLimits,
    clean_text,
)
from fp16rl.sandbox.grids import check_grid
from fp16rl.sandbox.undumpable import TrainerNotDumpable, trainer_exposed

_HEADER_CAP = 4096  # bytes of one server message
_WORKER_GRACE_S = 3.0  # how long past the program timeout a server may take to answer
_START_TIMEOUT_S = 60.0  # a cold numpy import on a loaded machine can take seconds
_READ_INTERVAL_S = 0.001  # the result pipe is read at most this often while a program runs
_MEMORY_KILL_FRACTION = 0.8  # a crash at >= this share of memory_mb counts as MEMORY_LIMIT
_F_SETPIPE_SZ = 1031


class Sandbox:
    """A pool of pre-warmed fork servers that run programs in confined children."""

    def __init__(
        self,
        n_jobs: int = -1,
        limits: SandboxLimits = SandboxLimits(),
        *,
        disable: Iterable[str] | None = None,
    ) -> None:
        """Start n_jobs workers (-1: one per CPU this rank may use); disable optional layers by name.

        ``disable=None`` reads the comma-separated ``FP16RL_SANDBOX_DISABLE`` variable.
        """
        if n_jobs == -1:  # the CPUs of this process, shared with the other ranks on the machine (torchrun)
            n_jobs = cpus_per_rank()
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be -1 or >= 1, got {n_jobs}")
        if disable is None:
            disable = [name for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()]
        disabled = sorted({name.strip() for name in disable})
        unknown = set(disabled) - set(OPTIONAL_LAYERS)
        if unknown:
            raise ValueError(f"unknown sandbox layers {sorted(unknown)}; known: {OPTIONAL_LAYERS}")
        self.limits = limits
        self._base = tempfile.mkdtemp(prefix="fp16rl-sandbox-")
        os.chmod(self._base, 0o711)  # an unprivileged child must traverse into its workdir
        config = {"limits": asdict(limits), "disable": disabled, "base": self._base}
        self._workers = [_Worker(config) for _ in range(n_jobs)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for worker in self._workers:
                worker.spawn()
            for worker in self._workers:
                worker.await_hello()
                self._idle.put(worker)
            self._undumpable = trainer_exposed(self.layers())
            if self._undumpable:
                TrainerNotDumpable.acquire()
        except BaseException:
            for worker in self._workers:
                worker.stop()
            shutil.rmtree(self._base, ignore_errors=True)
            raise
        self._pool = ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="sandbox")
        self._closed = False

    def layers(self) -> dict[str, str]:
        """Isolation layers on this machine: ``"active"`` or why not (log it with the run)."""
        return dict(self._workers[0].layers)

    def run(self, code: str, inputs: list[Grid]) -> ExecutionResult:
        """Run plain Python source defining ``transform`` on each input grid (a fresh list of
        lists per call); thread-safe, and never raises because of what the program did."""
        request = json.dumps({"code": code, "inputs": inputs}).encode()
        worker = self._idle.get()
        start = time.monotonic()
        try:
            if self._closed:
                raise RuntimeError("Sandbox is closed")
            result = worker.execute(request, len(inputs), self.limits)
        finally:
            self._idle.put(worker)
        result.duration_s = time.monotonic() - start
        return result

    def run_many(self, jobs: Sequence[tuple[str, list[Grid]]]) -> list[ExecutionResult]:
        """Run (code, inputs) jobs on all workers in parallel; results in job order."""
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def close(self) -> None:
        """Kill the workers (each once its current program is done) and remove the working
        directories; idempotent, and later runs raise instead of respawning workers."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        workers = [self._idle.get() for _ in self._workers]
        for worker in workers:
            worker.stop()
            self._idle.put(worker)
        shutil.rmtree(self._base, ignore_errors=True)
        if self._undumpable:
            TrainerNotDumpable.release()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _WorkerFailure(Exception):
    """The fork server died, hung or broke protocol; it has been killed."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class _Worker:
    """Trainer-side handle of one fork server, restarted whenever it dies or misbehaves."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = json.dumps(config)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.layers: dict[str, str] = {}

    def spawn(self) -> None:
        """Start the server (fresh interpreter, isolated mode, minimal environment)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": os.defpath, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        if "LD_LIBRARY_PATH" in os.environ:  # some Python builds need it to find libpython
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-m", "fp16rl.sandbox.server", self._config],
                stdin=child_sock, stdout=child_sock, env=env, start_new_session=True,
            )
        finally:
            child_sock.close()
        self._sock = parent_sock

    def await_hello(self) -> None:
        """Read the server's layer report; raise if it does not come up."""
        try:
            hello = self._message(time.monotonic() + _START_TIMEOUT_S)
            if "error" in hello:
                raise TypeError(clean_text(hello["error"], 2000))
            layers = hello.get("layers")
            if not isinstance(layers, dict):
                raise TypeError(f"no layer report in {clean_text(str(hello))!r}")
        except (_WorkerFailure, TypeError) as exc:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {exc}") from None
        self.layers = {str(name): str(status) for name, status in layers.items()}

    def execute(self, request: bytes, n_inputs: int, limits: SandboxLimits) -> ExecutionResult:
        """Run one program; a dead, hung or confused worker is killed and becomes a result."""
        if self._proc is None:
            self.spawn()
            self.await_hello()
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(result_r, _F_SETPIPE_SZ, min(max(limits.max_output_bytes + 1, 1 << 16), 1 << 20))
            except OSError:
                pass  # the default 64 KiB: the read loop below keeps the child from blocking long
            try:
                self._send_run(request_r, result_w)
            except OSError:  # died while idle (killed from outside): the program has not run yet
                self.stop()
                self.spawn()
                self.await_hello()
                self._send_run(request_r, result_w)
        except BaseException:
            for fd in (request_w, result_r):
                os.close(fd)
            raise
        finally:
            os.close(request_r)
            os.close(result_w)
        try:
            header, payload, oversize = self._exchange(request, request_w, result_r, limits)
        except _WorkerFailure as failure:
            self.stop()
            return ExecutionResult(failure.outcome, [None] * n_inputs, str(failure))
        return interpret(header, payload, n_inputs, limits, oversize=oversize)

    def _send_run(self, request_r: int, result_w: int) -> None:
        assert self._sock is not None
        self._sock.settimeout(_START_TIMEOUT_S)
        socket.send_fds(self._sock, [b"run"], [request_r, result_w])

    def _exchange(self, request: bytes, request_w: int, result_r: int,
                  limits: SandboxLimits) -> tuple[dict[str, Any], bytes, bool]:
        """Feed the request, collect at most cap + 1 result bytes, and wait for the server's
        report; returns (report, result bytes, whether the cap was exceeded)."""
        assert self._sock is not None
        cap = limits.max_output_bytes
        deadline = time.monotonic() + limits.timeout_s + _WORKER_GRACE_S
        pending = memoryview(request)
        data = bytearray()
        header: dict[str, Any] | None = None
        oversize = False
        next_read = 0.0
        os.set_blocking(request_w, False)
        os.set_blocking(result_r, False)
        open_fds = {request_w, result_r}
        try:
            while header is None:
                now = time.monotonic()
                if now >= deadline:
                    raise _WorkerFailure(Outcome.TIMEOUT, "sandbox worker did not answer in time")
                poller = select.poll()
                poller.register(self._sock.fileno(), select.POLLIN)
                if request_w in open_fds:
                    poller.register(request_w, select.POLLOUT)
                wait_s = deadline - now
                if result_r in open_fds:
                    if now >= next_read:
                        poller.register(result_r, select.POLLIN)
                    else:
                        wait_s = min(wait_s, next_read - now)
                for fd, _ in poller.poll(max(1, math.ceil(wait_s * 1000))):
                    if fd == request_w:
                        try:
                            pending = pending[os.write(request_w, pending[: 1 << 16]):]
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:  # the child is gone: the report will say why
                            pending = pending[:0]
                        if not pending:
                            os.close(request_w)
                            open_fds.discard(request_w)
                    elif fd == result_r:
                        next_read = time.monotonic() + _READ_INTERVAL_S
                        if _read_some(result_r, data, cap) is None:
                            os.close(result_r)
                            open_fds.discard(result_r)
                        elif len(data) > cap:
                            oversize = True
                            try:
                                self._sock.send(b"kill")
                            except OSError:
                                pass  # the server is gone: reading its report will say so
                            os.close(result_r)
                            open_fds.discard(result_r)
                    else:
                        header = self._message(deadline)
            if result_r in open_fds:  # what the child wrote before it ended is in the pipe
                while len(data) <= cap and _read_some(result_r, data, cap):
                    pass  # stops when the pipe is empty, even if a leftover process holds it
                oversize = oversize or len(data) > cap
        finally:
            for fd in open_fds:
                os.close(fd)
        return header, bytes(data[:cap]), oversize

    def _message(self, deadline: float) -> dict[str, Any]:
        """One JSON object from the server (its hello or a report)."""
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _WorkerFailure(Outcome.TIMEOUT, "sandbox worker did not answer in time")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(_HEADER_CAP)
        except TimeoutError:
            raise _WorkerFailure(Outcome.TIMEOUT, "sandbox worker did not answer in time") from None
        except OSError as exc:
            raise _WorkerFailure(Outcome.EXCEPTION, f"sandbox worker connection failed: {exc}") from None
        if not data:
            raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker died while running the program")
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker broke protocol")
        return message

    def stop(self) -> None:
        """Kill the server's process group (its PID namespace dies with it) and reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait()
            self._proc = None


def _read_some(fd: int, data: bytearray, cap: int) -> int | None:
    """Append what is available (never more than cap + 1 bytes in all): how many bytes were
    read, 0 if none are waiting, None at end of file."""
    try:
        chunk = os.read(fd, min(1 << 16, cap + 1 - len(data)) or 1)
    except (BlockingIOError, InterruptedError):
        return 0
    data += chunk
    return len(chunk) or None


# --- parsing what the child wrote and what the server saw ----------------------------------

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
