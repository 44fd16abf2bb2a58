"""The trainer side: the worker pool and the per-program pipes.

Per program the trainer makes two pipes, hands the child's ends to a fork server over its unix
socket, writes the request into one and reads at most ``max_output_bytes`` from the other while
waiting for the server's short report of how the child ended. Nothing here ever raises because
of what a program did: every byte it could control goes through the total parser
:func:`~fp16rl.sandbox.results.interpret`, which maps any input to an :class:`ExecutionResult`.
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
    OPTIONAL_LAYERS,
    ExecutionResult,
    Grid,
    Outcome,
    SandboxLimits,
    clean_text,
)
from fp16rl.sandbox.results import interpret
from fp16rl.sandbox.undumpable import TrainerNotDumpable, trainer_exposed

_HEADER_CAP = 4096  # bytes of one server message
_WORKER_GRACE_S = 3.0  # how long past the program timeout a server may take to answer
_START_TIMEOUT_S = 60.0  # a cold numpy import on a loaded machine can take seconds
_READ_INTERVAL_S = 0.001  # the result pipe is read at most this often while a program runs
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
                        pending = _feed(request_w, pending, open_fds)
                    elif fd == result_r:
                        next_read = time.monotonic() + _READ_INTERVAL_S
                        if self._collect(result_r, data, cap, open_fds):
                            oversize = True
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

    def _collect(self, result_r: int, data: bytearray, cap: int, open_fds: set[int]) -> bool:
        """Read what the result pipe holds into ``data``; close it at end of file, or once past the
        cap, when the server is also told to kill the program. Returns whether the cap was exceeded."""
        assert self._sock is not None
        if _read_some(result_r, data, cap) is None:
            os.close(result_r)
            open_fds.discard(result_r)
        elif len(data) > cap:
            try:
                self._sock.send(b"kill")
            except OSError:
                pass  # the server is gone: reading its report will say so
            os.close(result_r)
            open_fds.discard(result_r)
            return True
        return False

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


def _feed(request_w: int, pending: memoryview, open_fds: set[int]) -> memoryview:
    """Write what the request pipe takes of the unsent request; what is left to send. The pipe is
    closed once all is written, or when the child is gone (its report will say why)."""
    try:
        pending = pending[os.write(request_w, pending[: 1 << 16]):]
    except (BlockingIOError, InterruptedError):
        return pending
    except OSError:
        pending = pending[:0]
    if not pending:
        os.close(request_w)
        open_fds.discard(request_w)
    return pending


def _read_some(fd: int, data: bytearray, cap: int) -> int | None:
    """Append what is available (never more than cap + 1 bytes in all): how many bytes were
    read, 0 if none are waiting, None at end of file."""
    try:
        chunk = os.read(fd, min(1 << 16, cap + 1 - len(data)) or 1)
    except (BlockingIOError, InterruptedError):
        return 0
    data += chunk
    return len(chunk) or None
