"""The fork server: one worker of the sandbox pool, started as ``python -I -m fp16rl.sandbox.server``.

It imports numpy and a preamble once, sets up its namespaces and the per-worker layer state,
forks its zygote (:mod:`.zygote`), and then, per program, has the zygote clone a child (whose
parent is the server) that confines itself and reads its request itself.

No untrusted byte ever passes through the server: the trainer hands it two pipe ends over a
unix socket (SCM_RIGHTS), the child reads the program and its grids from one and writes its
results into the other, and the server only reports what it observed (exit status, signal,
timeout, resource usage). Every child is forked from the zygote's clean state, which never
held an earlier program's code, inputs, results or report, so a program can find none of them in
the memory it inherits. The server, its zygote and every child are not dumpable (their /proc
entries are root's), and all run with oom_score_adj 1000: under memory pressure the kernel kills a
program, or a worker the trainer then restarts, before the trainer.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import json
import math
import mmap
import os
import random
import resource
import select
import shutil
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import numpy as np

from fp16rl.sandbox.common import (
    ACTIVE,
    DISABLED,
    ERROR_CHARS,
    EXIT_CHANNEL_BROKEN,
    EXIT_OK,
    EXIT_SETUP_FAILED,
    OPTIONAL_LAYERS,
    Grid,
    SandboxLimits,
    clean_text,
)
from fp16rl.sandbox.confine import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    Confinement,
    die_with_parent,
    make_mounts_private,
    prctl,
    unshare,
)
from fp16rl.sandbox.grids import normalize_output
from fp16rl.sandbox.zygote import Zygote

# Executed once in every fork server; each program starts from a copy of the namespace, so
# model code that forgets ``import numpy as np`` still runs (as it did in the original).
PREAMBLE = """\
import numpy as np
import numpy
import collections, copy, functools, heapq, itertools, math, random, re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union
"""
MAX_REQUEST_BYTES = 64 << 20  # a request is code plus at most a few dozen 30x30 grids
REQUEST_FD = 3  # and the results go to 4, in every program's child
_PR_SET_DUMPABLE = 4
_OOM_SCORE_ADJ = b"1000"  # the most the OOM killer can prefer a process; raising needs no privilege


class _Server:
    """One program at a time, each in a fresh confined child cloned from the zygote."""

    def __init__(self, config: dict[str, Any], sock: socket.socket, layers: dict[str, str]) -> None:
        self.limits = SandboxLimits(**config["limits"])
        self.sock = sock
        self.namespace: dict[str, Any] = {"__name__": "program"}
        exec(PREAMBLE, self.namespace)
        np.random.seed(0)  # the first call costs ~10 ms of lazy set-up: pay it once, here
        self.confinement = Confinement(self.limits, layers, config["base"])
        self.confinement.prepare()
        self._wake_r, self._wake_w = os.pipe()  # SIGCHLD wakes the poll loop (no pidfd needed)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        gc.freeze()  # a collection in a child must not touch (copy) every inherited page
        # Last, before any program ran: the zygote's memory holds no report, ever.
        self.zygote = Zygote(functools.partial(_child, self), release=self._close_own_fds,
                             new_pid_namespace=self.confinement.layers.get("pid_namespace") == ACTIVE)

    def _close_own_fds(self) -> None:
        """In the zygote: the trainer's socket and the wake-up pipe are the server's alone."""
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def layers(self) -> dict[str, str]:
        """Every layer's status, in the order config.yaml reports them."""
        return {"rlimits": ACTIVE, **{name: self.confinement.layers[name] for name in OPTIONAL_LAYERS}}

    def serve(self) -> NoReturn:
        """Answer run requests until the trainer closes the socket (or dies)."""
        self.sock.send(json.dumps({"layers": self.layers()}).encode())
        while True:
            message, fds = self._receive()
            if message == b"run" and len(fds) == 2:
                header = self._run(*fds)
                self.sock.send(json.dumps(header).encode())
            else:  # a late "kill" for a program that had already ended
                for fd in fds:
                    os.close(fd)

    def _receive(self) -> tuple[bytes, list[int]]:
        """One message from the trainer; exit when it has gone."""
        try:
            message, fds, _, _ = socket.recv_fds(self.sock, 64, 2)
        except OSError:
            os._exit(0)
        if not message and not fds:
            os._exit(0)
        return message, fds

    def _run(self, request_fd: int, result_fd: int) -> dict[str, Any]:
        """Have the zygote clone one confined child on the trainer's pipes, supervise it (it is
        our child), kill what it left."""
        self._reap()
        workdir = self.confinement.workdir()
        start = time.monotonic()
        try:
            try:
                pid = self.zygote.spawn(request_fd, result_fd, workdir)
            except OSError as exc:
                return {"status": "fork_failed", "error": str(exc)}
            finally:
                os.close(request_fd)
                os.close(result_fd)
            return self._supervise(pid, start + self.limits.timeout_s)
        finally:
            if not self.confinement.in_view:
                shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, pid: int, deadline: float) -> dict[str, Any]:
        """Wait for the child to exit, the deadline, or the trainer's "kill" (oversize output)."""
        poller = select.poll()
        for fd in (self._wake_r, self.sock.fileno()):
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
                        waited, status = reaped, "exited"
                elif status is None:
                    message, fds = self._receive()
                    for extra in fds:
                        os.close(extra)
                    if message == b"kill":
                        status = "killed"
        self._kill_leftovers(pid)
        if waited is None:
            waited = os.wait4(pid, 0)
        _, wait_status, usage = waited
        header: dict[str, Any] = {"status": status, "maxrss_kb": usage.ru_maxrss,
                                  "cpu_s": usage.ru_utime + usage.ru_stime}
        if status == "exited" and os.WIFSIGNALED(wait_status):
            header.update(status="signaled", signal=os.WTERMSIG(wait_status))
        elif status == "exited":
            header["code"] = os.WEXITSTATUS(wait_status)
        return header

    def _kill_leftovers(self, pid: int) -> None:
        """SIGKILL the child's process group and the child; with a PID namespace the child is
        its namespace's init, and every process in it dies with it."""
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass

    def _reap(self) -> None:
        """Collect zombies of orphans (we are their reaper as namespace init) and of a zygote
        that died (then the next spawn ends this server)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


def _child(server: _Server, request_fd: int, result_fd: int, workdir: str) -> NoReturn:
    """In the freshly cloned child: confine, then read the request and run it; never returns."""
    try:
        request_fd, result_fd = _renumber((request_fd, result_fd), REQUEST_FD)
        server.confinement.apply(workdir, (request_fd, result_fd), strict=True)
    except BaseException as exc:
        _emit(result_fd, {"kind": "setup_error", "error": _describe(exc)})
        os._exit(EXIT_SETUP_FAILED)
    request = _read_request(request_fd)
    _run_program(result_fd, request["code"], request["inputs"], server.namespace, server.limits.max_grid_side)
    os._exit(EXIT_OK)


def _renumber(fds: tuple[int, int], first: int) -> tuple[int, int]:
    """Move fds to first, first + 1 (a fixed layout for every program: 0-2 /dev/null, 3 the
    request, 4 the results); the server's own descriptors are closed by the confinement."""
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]  # clear of 3 and 4 first
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(moved, first):
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
    return first, first + 1


def _read_request(fd: int) -> dict[str, Any]:
    """The trainer's JSON request (code and grids), read from its own pipe after the fork."""
    chunks = []
    size = 0
    while size <= MAX_REQUEST_BYTES:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


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
            normalized, reason = normalize_output(result, max_side)
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
    """``Type: message``, short and printable; survives a hostile ``__str__``."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:
        text = type(exc).__name__
    return clean_text(text if type(text) is str else "", ERROR_CHARS)


def _emit(fd: int, message: dict[str, Any]) -> None:
    """Write one JSON line; a closed pipe means the program sabotaged reporting: exit."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        os._exit(EXIT_CHANNEL_BROKEN)


def _drain(fd: int) -> None:
    """Empty a non-blocking pipe (the SIGCHLD wake-up bytes)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _namespace(flag: int, name: str, disabled: set[str]) -> str:
    """Enter a new namespace of one kind; the layer's status."""
    if name in disabled:
        return DISABLED
    try:
        unshare(flag)
    except OSError as exc:
        return f"unavailable: {exc.strerror or exc}"
    return ACTIVE


def main(config_json: str) -> NoReturn:
    """Entry point: namespaces first (the PID namespace through one more fork), then serve."""
    config = json.loads(config_json)
    disabled = set(config["disable"])
    try:
        with open("/proc/self/oom_score_adj", "wb") as oom:  # inherited by the zygote and programs
            oom.write(_OOM_SCORE_ADJ)
    except OSError:
        pass  # no /proc: the OOM killer then weighs programs by size alone
    prctl(_PR_SET_DUMPABLE, 0)  # then /proc/<pid>/fd, mem, environ are root's, here and below
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # a stray print can never reach the protocol socket
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a program could signal us as PID 1
    layers = {name: DISABLED for name in disabled}
    for flag, name in ((CLONE_NEWNET, "net_namespace"), (CLONE_NEWIPC, "ipc_namespace"),
                       (CLONE_NEWNS, "mount_namespace")):
        layers[name] = _namespace(flag, name, disabled)
    if layers["mount_namespace"] == ACTIVE:
        try:
            make_mounts_private()
        except OSError as exc:
            layers["mount_namespace"] = f"unavailable: {exc.strerror or exc}"
    layers["pid_namespace"] = _namespace(CLONE_NEWPID, "pid_namespace", disabled)
    if layers["pid_namespace"] == ACTIVE:
        server = os.fork()  # the first child is PID 1 of the new namespace: the real server
        if server:
            sock.close()
            _, status = os.waitpid(server, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        die_with_parent()
    try:
        server = _Server(config, sock, layers)
    except BaseException as exc:  # tell the trainer why instead of just dying
        sock.send(json.dumps({"error": clean_text(f"{type(exc).__name__}: {exc}", 2000)}).encode())
        os._exit(1)
    server.serve()


if __name__ == "__main__":
    main(sys.argv[1])
