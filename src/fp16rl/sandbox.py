"""Run untrusted, model-written ``transform(grid)`` programs on ARC grids, safely and fast.

Why this shape
--------------
A policy model under RL writes arbitrary Python; some of it loops forever, allocates without
bound, or (by accident or reward hacking) touches files, the network, or other processes.
Substring blacklists are both leaky and over-strict, so isolation here is done by the kernel:

* Each worker is a *fork server*: a long-lived helper process (a fresh ``python -I``, not a
  fork of the trainer) that has already imported numpy and a small preamble. Per program it
  ``fork()``s a child, so a trivial program costs a few ms instead of the ~100+ ms of a fresh
  interpreter that imports numpy.
* The child confines itself before running user code (see ``Layers`` below), runs
  ``transform`` on every input grid and streams one JSON line per grid into a pipe. The
  server enforces the wall-clock limit, kills the child's whole process group (and, as init
  of its own PID namespace, every process in it), and forwards the raw bytes, capped.
* The parent (trainer) never unpickles anything: it parses the capped bytes as JSON and
  re-validates every grid, because the child could have written anything into its pipe.
  Whatever the program does, the trainer sees an :class:`ExecutionResult`; a dead or hung
  worker is killed and respawned.

Layers (``Sandbox.layers()`` says which are active on this machine)
-------------------------------------------------------------------
``rlimits`` (always): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE=0 (no file contents
written), RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC=0; plus setsid, closed file descriptors,
stdio on /dev/null, an empty environment, a fresh empty working directory.
``privilege_drop`` (root only): uid/gid 65534 and no capabilities except CAP_DAC_READ_SEARCH
(kept so imports from a root-only Python install keep working; file *reading* is confined by
Landlock instead). Makes RLIMIT_NPROC effective, forbids signalling or ptracing root processes
and writing root-owned files.
``pid_namespace``: the server is PID 1 of its own namespace: a program cannot see or signal
anything outside, and ``kill(-1, SIGKILL)`` after each program reaps every leftover.
``net_namespace``: the server and its children live in a fresh network namespace with no
interfaces up: no connection can leave.
``landlock``: reading only under the Python installation, numpy and system library
directories; no file creation, writing, truncation or deletion anywhere; no TCP bind/connect
(ABI >= 4); no signals to processes outside the program (ABI >= 6).
``seccomp``: a BPF filter returning EPERM for process creation (fork/vfork/clone without
CLONE_THREAD), exec, socket creation, signalling, ptrace, namespace and mount changes,
io_uring, bpf, raising rlimits, opening files for writing and every path-modifying call.

Each optional layer is probed once per worker and reported as ``"active"``, ``"disabled
(...)"`` or ``"unavailable: <reason>"``; an active layer that fails to apply in a child
aborts that program (fail closed). Layers can be forced off with ``Sandbox(disable=...)`` or
``FP16RL_SANDBOX_DISABLE=landlock,seccomp``. Needs Linux (fork, pipes, setrlimit).
"""

from __future__ import annotations

import ctypes
import enum
import gc
import json
import math
import mmap
import os
import platform
import queue
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import numpy as np

Grid = list[list[int]]

OPTIONAL_LAYERS = ("privilege_drop", "pid_namespace", "net_namespace", "landlock", "seccomp")
DISABLE_ENV = "FP16RL_SANDBOX_DISABLE"
ACTIVE = "active"
_DISABLED = f"disabled ({DISABLE_ENV} or Sandbox(disable=...))"

# Executed once in every fork server; each program starts from a copy of the namespace, so
# model code that forgets ``import numpy as np`` still runs (as it did in the original).
PREAMBLE = """\
import numpy as np
import numpy
import collections, copy, functools, heapq, itertools, math, random, re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union
"""

_ERROR_CHARS = 300  # error strings are cut to this length
_HEADER_CAP = 4096  # bytes of a server response header
_WORKER_GRACE_S = 3.0  # how long past the program timeout a server may take to answer
_START_TIMEOUT_S = 60.0  # a cold numpy import on a loaded machine can take seconds
_RECURSION_LIMIT = 5000  # deep enough for recursive flood fills on 30x30 grids
_NOFILE = 64
_MEMORY_KILL_FRACTION = 0.8  # a crash at >= this share of memory_mb counts as MEMORY_LIMIT
_NOBODY = 65534


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


def extract_code(completion: str) -> str | None:
    """The code of the first ```python block, or None if there is none.

    The code starts on the line after the opening fence (anything after ``python`` on that
    line, such as ``3``, is ignored) and ends at the next triple backtick or, for an unclosed
    block (a completion cut at the token limit), at the end of the text, as in the original.
    ``py`` or bare fences do not count.
    """
    start = completion.find("```python")
    if start < 0:
        return None
    newline = completion.find("\n", start)
    if newline < 0:
        return ""
    end = completion.find("```", newline + 1)
    return completion[newline + 1 :] if end < 0 else completion[newline + 1 : end]


def validate_grid(obj: Any, max_side: int = 30) -> str | None:
    """None if obj is a non-empty rectangular 2-D grid of ints 0..9 with sides <= max_side.

    Otherwise the reason. Rows may be lists, tuples or 1-D arrays; a 2-D numpy array is
    accepted; integral floats (``np.zeros((h, w))`` is float64) count as ints, bools do not.
    """
    return _normalize_grid(obj, max_side)[1]


def _normalize_grid(obj: Any, max_side: int) -> tuple[Grid | None, str | None]:
    """(plain list-of-int-lists, None) for a valid grid, else (None, reason); sizes first."""
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            return None, f"expected a 2-D grid, got a {obj.ndim}-D array"
        if 0 in obj.shape:
            return None, "empty grid"
        if max(obj.shape) > max_side:
            return None, f"grid is {obj.shape[0]}x{obj.shape[1]}, sides must be <= {max_side}"
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        return None, f"expected a list of rows, got {type(obj).__name__}"
    if not obj:
        return None, "empty grid"
    if len(obj) > max_side:
        return None, f"{len(obj)} rows, at most {max_side} allowed"
    grid: Grid = []
    for r, row in enumerate(obj):
        if isinstance(row, np.ndarray) and row.ndim == 1 and row.size <= max_side:
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            return None, f"row {r} is {type(row).__name__}, not a list"
        if not row:
            return None, f"row {r} is empty"
        if len(row) > max_side:
            return None, f"row {r} has {len(row)} cells, at most {max_side} allowed"
        if grid and len(row) != len(grid[0]):
            return None, f"ragged grid: row {r} has {len(row)} cells, row 0 has {len(grid[0])}"
        cells = []
        for c, value in enumerate(row):
            cell = _cell(value)
            if cell is None:
                return None, f"cell ({r}, {c}) is {repr(value)[:20]}, not an int in 0..9"
            cells.append(cell)
        grid.append(cells)
    return grid, None


def _cell(value: Any) -> int | None:
    """The colour as a plain int, or None if value is not an integral number in 0..9."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        number = int(value)
    else:
        return None
    return number if 0 <= number <= 9 else None


class Sandbox:
    """A pool of pre-warmed fork servers that run programs in confined children."""

    def __init__(
        self,
        n_jobs: int = -1,
        limits: SandboxLimits = SandboxLimits(),
        *,
        disable: Iterable[str] | None = None,
    ) -> None:
        """Start n_jobs workers (-1: one per CPU); disable optional layers by name.

        ``disable=None`` reads the comma-separated ``FP16RL_SANDBOX_DISABLE`` variable.
        """
        if n_jobs == -1:
            n_jobs = os.cpu_count() or 1
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
        os.chmod(self._base, 0o711)  # the unprivileged child must traverse into its workdir
        config = {"limits": asdict(limits), "disable": disabled, "base": self._base}
        self._workers = [_Worker(config) for _ in range(n_jobs)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for worker in self._workers:
                worker.spawn()
            for worker in self._workers:
                worker.await_hello()
                self._idle.put(worker)
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
        lists per call); thread-safe."""
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

    def run_completion(self, completion: str, inputs: list[Grid]) -> ExecutionResult:
        """Extract the ```python block and run it; PARSE_ERROR when there is none."""
        code = extract_code(completion)
        if code is None:
            return ExecutionResult(Outcome.PARSE_ERROR, [None] * len(inputs), "no ```python block")
        return self.run(code, inputs)

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
    """Parent-side handle of one fork server, restarted whenever it dies or misbehaves."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = json.dumps(config)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.layers: dict[str, str] = {}

    def spawn(self) -> None:
        """Start the server (fresh interpreter, isolated mode, minimal environment)."""
        parent_sock, child_sock = socket.socketpair()
        env = {"PATH": os.defpath, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        if "LD_LIBRARY_PATH" in os.environ:  # some Python builds need it to find libpython
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.abspath(__file__), self._config],
                stdin=child_sock, stdout=child_sock, env=env, start_new_session=True,
            )
        finally:
            child_sock.close()
        self._sock = parent_sock

    def await_hello(self) -> None:
        """Read the server's layer report; raise if it does not come up."""
        try:
            header, _ = self._receive(time.monotonic() + _START_TIMEOUT_S, 0)
            layers = header["layers"]
            if not isinstance(layers, dict):
                raise TypeError("layers is not a dict")
        except (_WorkerFailure, KeyError, TypeError) as exc:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {exc}") from None
        self.layers = {str(name): str(status) for name, status in layers.items()}

    def execute(self, request: bytes, n_inputs: int, limits: SandboxLimits) -> ExecutionResult:
        """Send one program and interpret the answer; any worker failure becomes a result."""
        if self._proc is None:
            self.spawn()
            self.await_hello()
        try:
            self._send(request)
        except OSError:  # died while idle (killed from outside): the program has not run yet
            self.stop()
            self.spawn()
            self.await_hello()
            self._send(request)
        try:
            header, payload = self._receive(
                time.monotonic() + limits.timeout_s + _WORKER_GRACE_S, limits.max_output_bytes
            )
            return _interpret(header, payload, n_inputs, limits)
        except _WorkerFailure as failure:
            self.stop()
            return ExecutionResult(failure.outcome, [None] * n_inputs, str(failure))

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.settimeout(_START_TIMEOUT_S)
        self._sock.sendall(struct.pack("<I", len(data)) + data)

    def _receive(self, deadline: float, payload_cap: int) -> tuple[dict[str, Any], bytes]:
        """One response frame: ``<II`` lengths, a JSON header, the child's raw bytes."""
        sizes = self._read_exact(8, deadline)
        header_len, payload_len = struct.unpack("<II", sizes)
        if header_len > _HEADER_CAP or payload_len > payload_cap:
            raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker broke protocol (frame size)")
        try:
            header = json.loads(self._read_exact(header_len, deadline))
        except ValueError:
            raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker broke protocol (header)") from None
        if not isinstance(header, dict):
            raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker broke protocol (header)")
        return header, self._read_exact(payload_len, deadline)

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self._sock is not None
        data = bytearray()
        while len(data) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerFailure(Outcome.TIMEOUT, "sandbox worker did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(min(n - len(data), 1 << 20))
            except socket.timeout:
                continue
            except OSError as exc:
                raise _WorkerFailure(Outcome.EXCEPTION, f"sandbox worker connection failed: {exc}")
            if not chunk:
                raise _WorkerFailure(Outcome.EXCEPTION, "sandbox worker died while running the program")
            data += chunk
        return bytes(data)

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


def _interpret(header: dict[str, Any], payload: bytes, n: int, limits: SandboxLimits) -> ExecutionResult:
    """Turn the server's report and the child's JSON lines into a result; trusts nothing.

    The overall outcome is that of the first failure in grid order (grids run in order, so
    this is also the first in time); grids the child never reported take the process-level
    outcome (timeout, crash, oversize output).
    """
    outputs: list[Grid | None] = [None] * n
    failures: dict[int, tuple[Outcome, str]] = {}
    reported = [False] * n
    for line in payload.split(b"\n")[:-1]:  # an unterminated last piece is incomplete
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(message, dict):
            continue
        kind, error = message.get("kind"), _short(message.get("error"))
        index = message.get("i")
        if index is None:
            if kind in _PROGRAM_KINDS:
                prefix = "sandbox setup failed: " if kind == "setup_error" else ""
                return ExecutionResult(_PROGRAM_KINDS[kind], [None] * n, prefix + error)
            continue
        if type(index) is not int or not 0 <= index < n or reported[index]:
            continue
        reported[index] = True
        if "grid" in message:
            grid, reason = _normalize_grid(message["grid"], limits.max_grid_side)
            if grid is None:
                failures[index] = (Outcome.INVALID_OUTPUT, f"grid {index}: {reason}")
            outputs[index] = grid
        elif kind in _GRID_KINDS:
            failures[index] = (_GRID_KINDS[kind], f"grid {index}: {error}")
        else:
            failures[index] = (Outcome.EXCEPTION, f"grid {index}: malformed result")
    if not all(reported):
        failures.setdefault(reported.index(False), _process_failure(header, limits))
    if failures:
        outcome, error = failures[min(failures)]
        return ExecutionResult(outcome, outputs, error)
    return ExecutionResult(Outcome.OK, outputs)


_PROGRAM_KINDS = {
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


def _process_failure(header: dict[str, Any], limits: SandboxLimits) -> tuple[Outcome, str]:
    """Why the child stopped before reporting every grid, from the server's wait status."""
    status = header.get("status")
    if status == "timeout":
        return Outcome.TIMEOUT, f"timeout after {limits.timeout_s}s"
    if status == "oversize":
        return Outcome.INVALID_OUTPUT, f"result larger than {limits.max_output_bytes} bytes"
    if status == "fork_failed":
        return Outcome.EXCEPTION, f"sandbox could not start the program: {_short(header.get('error'))}"
    if status == "exited":
        return Outcome.EXCEPTION, f"program exited (code {header.get('code')}) without a valid result"
    if status != "signaled":
        return Outcome.EXCEPTION, "sandbox worker broke protocol (status)"
    number, cpu_s, maxrss_kb = header.get("signal"), header.get("cpu_s"), header.get("maxrss_kb")
    if not all(isinstance(v, (int, float)) for v in (number, cpu_s, maxrss_kb)):
        return Outcome.EXCEPTION, "sandbox worker broke protocol (status)"
    name = _signal_name(int(number))
    if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_s >= limits.cpu_limit()):
        return Outcome.TIMEOUT, f"CPU time limit of {limits.cpu_limit()}s exceeded ({name})"
    peak_mb = maxrss_kb / 1024
    # SIGKILL nobody asked for (kill is blocked) is the OOM killer; a crash near the cap is
    # an allocation failure that C code did not turn into MemoryError.
    if number == signal.SIGKILL or peak_mb >= _MEMORY_KILL_FRACTION * limits.memory_mb:
        return Outcome.MEMORY_LIMIT, f"killed by {name} at {peak_mb:.0f} MB peak RSS (limit {limits.memory_mb} MB)"
    return Outcome.EXCEPTION, f"killed by {name}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _short(text: Any) -> str:
    return str(text)[:_ERROR_CHARS] if text is not None else ""


# ---------------------------------------------------------------------------------------
# Fork server side: everything below runs in the helper processes, never in the trainer.
# ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_CLONE_THREAD = 0x00010000
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYS_LANDLOCK_CREATE_RULESET = 444  # same number on every architecture
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_READ = (1 << 0) | (1 << 2)  # EXECUTE (mmap of libraries) | READ_FILE
_LANDLOCK_READ_DIR = 1 << 3
_LANDLOCK_ABI_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}


def _check(result: int, what: str) -> int:
    """Raise OSError with errno for a failed libc call."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


def _landlock_ruleset(paths: Iterable[str]) -> int:
    """A Landlock ruleset fd allowing only reads beneath paths (and nothing on the network)."""
    abi = _check(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                               ctypes.c_uint32(1)), "landlock_create_ruleset")
    fs = _LANDLOCK_ABI_FS[max(v for v in _LANDLOCK_ABI_FS if v <= abi)]
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP with no rule: both denied
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("<QQQ", fs, net, scoped)[:size], size)
    ruleset = _check(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), attr,
                                   ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
    for path in paths:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            access = _LANDLOCK_READ | (_LANDLOCK_READ_DIR if os.path.isdir(path) else 0)
            rule = ctypes.create_string_buffer(struct.pack("<Qi", access, fd), 12)
            _check(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_long(ruleset),
                                 ctypes.c_long(1), rule, ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        finally:
            os.close(fd)
    return ruleset


def _landlock_restrict(ruleset_fd: int) -> None:
    _check(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset_fd),
                         ctypes.c_uint32(0)), "landlock_restrict_self")


def _readable_paths() -> list[str]:
    """What a program may read: the interpreter, numpy and shared-library directories."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(np.__file__)), "/usr/lib", "/usr/lib64",
                  "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache"]
    paths = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.exists(real) and real not in paths:
            paths.append(real)
    return paths


# x86_64 syscall numbers. Other architectures get no seccomp layer rather than a wrong table.
_X86_64_DENY = {
    # process creation and exec (clone with CLONE_THREAD stays allowed, clone3 -> ENOSYS)
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
    # network and IPC endpoints
    "socket": 41, "socketpair": 53,
    # other processes: signals, tracing, memory, handles
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311,
    # namespaces, mounts, kernel facilities that bypass or widen the filter
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
    "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "reboot": 169, "setrlimit": 160,
    "open_by_handle_at": 304, "name_to_handle_at": 303,
    # anything that changes the file system
    "creat": 85, "truncate": 76, "unlink": 87, "unlinkat": 263, "rename": 82, "renameat": 264,
    "renameat2": 316, "rmdir": 84, "mkdir": 83, "mkdirat": 258, "link": 86, "linkat": 265,
    "symlink": 88, "symlinkat": 266, "mknod": 133, "mknodat": 259, "chmod": 90, "fchmod": 91,
    "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "utime": 132, "utimes": 235, "utimensat": 280,
    "futimesat": 261,
}
_X86_64_CLONE, _X86_64_CLONE3, _X86_64_OPENAT2, _X86_64_PRLIMIT64 = 56, 435, 437, 302
_X86_64_OPEN_FLAGS_ARG = {2: 1, 257: 2}  # open(path, flags), openat(dirfd, path, flags)
_AUDIT_ARCH_X86_64 = 0xC000003E
_O_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def _seccomp_program() -> bytes:
    """The BPF filter (x86_64): deny the listed calls with EPERM, allow everything else."""
    if platform.machine() != "x86_64":
        raise OSError(0, f"seccomp table only for x86_64 (this is {platform.machine()})")
    def arg_lo(i: int) -> int:
        return 16 + 8 * i
    code: list[tuple[int, Any, Any, int]] = [  # (op, jump-if-true, jump-if-false, k); labels as str
        (_BPF_LD_ABS, 0, 0, 4),  # arch
        (_BPF_JEQ, 1, 0, _AUDIT_ARCH_X86_64),
        (_BPF_RET, 0, 0, _RET_KILL_PROCESS),  # foreign ABI (int 0x80): no table to check
        (_BPF_LD_ABS, 0, 0, 0),  # syscall number
        (_BPF_JGE, "eperm", 0, 0x40000000),  # x32 ABI
        (_BPF_JEQ, "clone", 0, _X86_64_CLONE),
        (_BPF_JEQ, "enosys", 0, _X86_64_CLONE3),  # flags live in memory; glibc falls back to clone
        (_BPF_JEQ, "enosys", 0, _X86_64_OPENAT2),
        (_BPF_JEQ, "prlimit", 0, _X86_64_PRLIMIT64),
        *[(_BPF_JEQ, f"open{arg}", 0, nr) for nr, arg in _X86_64_OPEN_FLAGS_ARG.items()],
        *[(_BPF_JEQ, "eperm", 0, nr) for nr in _X86_64_DENY.values()],
        (_BPF_RET, 0, 0, _RET_ALLOW),
    ]
    labels: dict[str, int] = {}
    def block(name: str, *instructions: tuple[int, Any, Any, int]) -> None:
        labels[name] = len(code)
        code.extend(instructions)
    block("clone", (_BPF_LD_ABS, 0, 0, arg_lo(0)), (_BPF_JSET, "allow", "eperm", _CLONE_THREAD))
    for arg in set(_X86_64_OPEN_FLAGS_ARG.values()):
        block(f"open{arg}", (_BPF_LD_ABS, 0, 0, arg_lo(arg)), (_BPF_JSET, "eperm", "allow", _O_WRITE_FLAGS))
    block("prlimit", (_BPF_LD_ABS, 0, 0, arg_lo(2)), (_BPF_JEQ, 0, "eperm", 0),  # new limit NULL:
          (_BPF_LD_ABS, 0, 0, arg_lo(2) + 4), (_BPF_JEQ, "allow", "eperm", 0))  # a read, allowed
    block("allow", (_BPF_RET, 0, 0, _RET_ALLOW))
    block("eperm", (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM))
    block("enosys", (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS))
    out = bytearray()
    for pc, (op, jt, jf, k) in enumerate(code):
        jt, jf = (labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
        assert 0 <= jt < 256 and 0 <= jf < 256, "BPF jump out of range"
        out += struct.pack("<HBBI", op, jt, jf, k)
    return bytes(out)


class _SetupError(Exception):
    """An active layer failed to apply in a child: the program must not run."""


class _Server:
    """The fork server: one program at a time, each in a fresh confined child."""

    def __init__(self, config: dict[str, Any], sock: socket.socket, layers: dict[str, str]) -> None:
        self.limits = SandboxLimits(**config["limits"])
        self.base: str = config["base"]
        self.sock = sock
        self.pid = os.getpid()
        self.is_init = self.pid == 1  # init of our own PID namespace: kill(-1) is contained
        self.namespace: dict[str, Any] = {"__name__": "program"}
        exec(PREAMBLE, self.namespace)
        np.random.seed(0)  # the first call costs ~10 ms of lazy set-up: pay it once, here
        self.layers = layers
        self.ruleset_fd = -1
        self.seccomp_filter: ctypes.Array[ctypes.c_char] | None = None
        self.seccomp_prog: ctypes.Array[ctypes.c_char] | None = None
        self._prepare()
        self._wake_r, wake_w = os.pipe()  # SIGCHLD wakes the poll loop (no pidfd needed)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        gc.freeze()  # a collection in a child must not touch (copy) every inherited page

    def _prepare(self) -> None:
        """Build the per-worker layer state, then probe which layers a child can apply."""
        if "privilege_drop" not in self.layers and os.geteuid() != 0:
            self.layers["privilege_drop"] = f"unavailable: not root, programs keep uid {os.geteuid()}"
        if "landlock" not in self.layers:
            try:
                self.ruleset_fd = _landlock_ruleset(_readable_paths())
            except OSError as exc:
                self.layers["landlock"] = f"unavailable: {exc.strerror or exc}"
        if "seccomp" not in self.layers:
            try:
                program = _seccomp_program()
                self.seccomp_filter = ctypes.create_string_buffer(program, len(program))
                prog = struct.pack("<HxxxxxxQ", len(program) // 8, ctypes.addressof(self.seccomp_filter))
                self.seccomp_prog = ctypes.create_string_buffer(prog, len(prog))
            except OSError as exc:
                self.layers["seccomp"] = f"unavailable: {exc.strerror or exc}"
        candidates = [name for name in ("privilege_drop", "landlock", "seccomp") if name not in self.layers]
        probed = self._probe(candidates)
        for name in candidates:
            self.layers[name] = probed.get(name, "unavailable: probe child gave no report")
        self.layers["rlimits"] = ACTIVE
        self.layers = {name: self.layers[name] for name in ("rlimits", *OPTIONAL_LAYERS)}

    def _probe(self, candidates: list[str]) -> dict[str, str]:
        """Apply the candidate layers in a throwaway child and report each one's fate."""
        for name in candidates:
            self.layers[name] = ACTIVE
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                report = self._confine(write_fd, self.base, strict=False)
                _emit(write_fd, report)
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read(65536)
        os.waitpid(pid, 0)
        try:
            report = json.loads(data)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in report.items()}

    def serve(self) -> NoReturn:
        """Answer requests until the trainer closes the socket (or dies)."""
        _send_frame(self.sock, {"layers": self.layers}, b"")
        while True:
            size = _recv_exact(self.sock, 4)
            if size is None:
                os._exit(0)
            request = _recv_exact(self.sock, struct.unpack("<I", size)[0])
            if request is None:
                os._exit(0)
            message = json.loads(request)
            header, payload = self._run(message["code"], message["inputs"])
            _send_frame(self.sock, header, payload)

    def _run(self, code: str, inputs: list[Grid]) -> tuple[dict[str, Any], bytes]:
        """Fork one confined child, supervise it, kill everything it left behind."""
        self._reap()
        workdir = tempfile.mkdtemp(dir=self.base)
        os.chmod(workdir, 0o755)
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (read_fd, write_fd):
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
            return {"status": "fork_failed", "error": str(exc)}, b""
        if pid == 0:
            try:
                os.close(read_fd)
                self._child(write_fd, workdir, code, inputs)
            finally:
                os._exit(70)
        os.close(write_fd)
        try:
            return self._supervise(pid, read_fd, start + self.limits.timeout_s)
        finally:
            os.close(read_fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, pid: int, read_fd: int, deadline: float) -> tuple[dict[str, Any], bytes]:
        """Collect the child's bytes until it exits, overflows the cap or runs out of time."""
        cap = self.limits.max_output_bytes
        data = bytearray()
        poller = select.poll()
        for fd in (read_fd, self._wake_r):
            poller.register(fd, select.POLLIN)
        status: str | None = None
        waited: tuple[int, int, resource.struct_rusage] | None = None
        while status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for fd, _ in poller.poll(max(1, math.ceil(remaining * 1000))):
                if fd == self._wake_r:
                    _drain(self._wake_r)
                    reaped = os.wait4(pid, os.WNOHANG)
                    if reaped[0] == pid:
                        waited = reaped
                        status = "exited"
                elif not _read_into(read_fd, data, cap):
                    poller.unregister(read_fd)
                if len(data) > cap:
                    status = "oversize"
        self._kill_leftovers(pid)
        if waited is None:
            waited = os.wait4(pid, 0)
        os.set_blocking(read_fd, False)  # what it wrote before dying is still in the pipe
        while len(data) <= cap and _read_into(read_fd, data, cap):
            pass
        if len(data) > cap:
            status = "oversize"
        _, wait_status, usage = waited
        header: dict[str, Any] = {"status": status, "maxrss_kb": usage.ru_maxrss,
                                  "cpu_s": usage.ru_utime + usage.ru_stime}
        if status == "exited" and os.WIFSIGNALED(wait_status):
            header.update(status="signaled", signal=os.WTERMSIG(wait_status))
        elif status == "exited":
            header["code"] = os.WEXITSTATUS(wait_status)
        return header, bytes(data[:cap])

    def _kill_leftovers(self, pid: int) -> None:
        """SIGKILL the child's process group and, as namespace init, every other process."""
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        if self.is_init:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        """Collect zombies of killed grandchildren (we are their reaper as namespace init)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _child(self, result_fd: int, workdir: str, code: str, inputs: list[Grid]) -> NoReturn:
        """Confine this freshly forked process, then run the program; never returns."""
        try:
            self._confine(result_fd, workdir, strict=True)
        except BaseException as exc:
            _emit(result_fd, {"kind": "setup_error", "error": _describe(exc)})
            os._exit(71)
        _run_program(result_fd, code, inputs, self.namespace, self.limits.max_grid_side)
        os._exit(0)

    def _confine(self, result_fd: int, workdir: str, strict: bool) -> dict[str, str]:
        """Apply every layer to this (child) process; returns each optional layer's status.

        Mandatory steps raise; an optional layer marked active raises when strict (a real
        program) and is reported as unavailable otherwise (the probe).
        """
        report: dict[str, str] = {}

        def layer(name: str, apply: Any) -> None:
            if self.layers.get(name) != ACTIVE:
                return
            try:
                apply()
                report[name] = ACTIVE
            except OSError as exc:
                if strict:
                    raise _SetupError(f"{name}: {exc}") from None
                report[name] = f"unavailable: {exc.strerror or exc}"

        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir(workdir)
        os.environ.clear()
        memory = self.limits.memory_mb * 2**20
        cpu = self.limits.cpu_limit()
        for limit, value in ((resource.RLIMIT_AS, (memory, memory)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                             (resource.RLIMIT_FSIZE, (0, 0)), (resource.RLIMIT_CORE, (0, 0)),
                             (resource.RLIMIT_NOFILE, (_NOFILE, _NOFILE))):
            resource.setrlimit(limit, value)
        layer("privilege_drop", _drop_privileges)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # ignored for root: see the layers
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        if os.getppid() != self.pid:
            os._exit(72)  # the server died before we could tie our life to it
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        layer("landlock", lambda: _landlock_restrict(self.ruleset_fd))
        os.closerange(3, result_fd)
        os.closerange(result_fd + 1, 1 << 16)
        layer("seccomp", lambda: _seccomp_install(self.seccomp_prog))
        sys.setrecursionlimit(_RECURSION_LIMIT)
        sys.dont_write_bytecode = True
        return report


def _seccomp_install(prog: ctypes.Array[ctypes.c_char] | None) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)."""
    assert prog is not None
    _check(_libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(2), ctypes.c_void_p(ctypes.addressof(prog)),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


def _drop_privileges() -> None:
    """Become uid/gid 65534 keeping only CAP_DAC_READ_SEARCH (reads stay Landlock's job)."""
    _prctl(_PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(_NOBODY, _NOBODY, _NOBODY)
    os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    keep = 1 << _CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable x2
    _check(_libc.capset(header, data), "capset")
    _prctl(_PR_SET_KEEPCAPS, 0)


def _run_program(fd: int, code: str, inputs: list[Grid], namespace: dict[str, Any], max_side: int) -> None:
    """In the confined child: compile, define, run transform per grid, one JSON line each."""
    # Address space held back (mapped, never touched: free of page faults) and released on
    # MemoryError so that reporting it can still allocate under RLIMIT_AS.
    reserve = mmap.mmap(-1, 1 << 20)
    random.seed(0)  # same program, same grids -> same result, whichever worker runs it
    np.random.seed(0)
    try:
        compiled = compile(code, "<program>", "exec")
    except BaseException as exc:
        reserve.close()
        kind = "memory_limit" if isinstance(exc, MemoryError) else "parse_error"
        _emit(fd, {"kind": kind, "error": _describe(exc)})
        return
    globals_ = dict(namespace)
    try:
        exec(compiled, globals_)
    except BaseException as exc:
        reserve.close()
        _emit(fd, {"kind": _kind(exc), "error": _describe(exc)})
        return
    transform = globals_.get("transform")
    if not callable(transform):
        _emit(fd, {"kind": "exception", "error": "the program defines no function named transform"})
        return
    for index, grid in enumerate(inputs):
        try:
            result = transform([list(row) for row in grid])
        except BaseException as exc:
            exc.__traceback__ = None  # drop the frames (and what they allocated) first
            reserve.close()
            _emit(fd, {"i": index, "kind": _kind(exc), "error": _describe(exc)})
            continue
        try:
            normalized, reason = _normalize_grid(result, max_side)
        except BaseException as exc:
            normalized, reason = None, f"unreadable output: {_describe(exc)}"
        if normalized is None:
            _emit(fd, {"i": index, "kind": "invalid_output", "error": reason})
        else:
            _emit(fd, {"i": index, "grid": normalized})


def _kind(exc: BaseException) -> str:
    """The outcome kind of an exception raised by the program (MemoryError is its own)."""
    return "memory_limit" if isinstance(exc, MemoryError) else "exception"


def _describe(exc: BaseException) -> str:
    """``Type: message``, short; survives a hostile ``__str__``."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:
        text = type(exc).__name__
    return text[:_ERROR_CHARS]


def _emit(fd: int, message: dict[str, Any]) -> None:
    """Write one JSON line; a closed pipe means the program sabotaged reporting: exit."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        os._exit(73)


def _read_into(fd: int, data: bytearray, cap: int) -> bool:
    """Append what is available (never more than cap + 1 bytes in all); False at EOF."""
    try:
        chunk = os.read(fd, min(65536, cap + 1 - len(data)) or 1)
    except BlockingIOError:
        return False
    data += chunk
    return bool(chunk)


def _drain(fd: int) -> None:
    """Empty a non-blocking pipe (the SIGCHLD wake-up bytes)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes) -> None:
    """Server -> trainer: ``<II`` lengths, JSON header, the child's raw bytes."""
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("<II", len(head), len(payload)) + head + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from the trainer, or None once it has gone (EOF)."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _unshare(flag: int, name: str, disabled: set[str]) -> str:
    """Enter a new namespace of one kind; the layer's status."""
    if name in disabled:
        return _DISABLED
    if _libc.unshare(ctypes.c_int(flag)) != 0:
        return f"unavailable: unshare failed: {os.strerror(ctypes.get_errno())}"
    return ACTIVE


def _serve(config_json: str) -> NoReturn:
    """Entry point of a worker process (started by :class:`_Worker` as a script)."""
    config = json.loads(config_json)
    disabled = set(config["disable"])
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # a stray print can never reach the protocol socket
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a program could signal us as PID 1
    layers = {name: _DISABLED for name in disabled}
    layers["net_namespace"] = _unshare(_CLONE_NEWNET, "net_namespace", disabled)
    layers["pid_namespace"] = _unshare(_CLONE_NEWPID, "pid_namespace", disabled)
    if layers["pid_namespace"] == ACTIVE:
        server = os.fork()  # the first child is PID 1 of the new namespace: the real server
        if server:
            sock.close()
            _, status = os.waitpid(server, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _Server(config, sock, layers).serve()


if __name__ == "__main__":
    _serve(sys.argv[1])
