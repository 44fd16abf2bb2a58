"""The zygote: the process every program's child is forked from, split off the fork server
before the first program runs.

Why a second process: the fork server waits for each child, so it learns that program's exit
status, peak memory and CPU time (its report), and a program can steer those. A child forked from
the server inherits the server's memory, where the previous report lies in a frame, in freed heap
or on the C stack; the next program could read it. The zygote is forked from the server once,
before any report exists, and never learns anything about a program: it only clones children
with CLONE_PARENT (so a child's parent, who waits for it and reads its resource usage, is the
server) and hands the server each child's pid and a socket to it. The child waits on that socket
for its two pipe ends and working directory; the next one is cloned while a program runs, so
the clone is not on any program's critical path. With a PID namespace the child is also PID 1 of
a new one: everything it leaves behind dies with it, the server's ``kill(-1)`` (which would hit
the zygote) is not needed, and ``getpid()`` (1) does not tell a program how many threads earlier
programs started.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
from collections.abc import Callable
from typing import NoReturn

from fp16rl.sandbox.common import EXIT_SETUP_FAILED
from fp16rl.sandbox.confine import die_with_parent

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_CLONE_PARENT = 0x00008000
_CLONE_NEWPID = 0x20000000
# clone(2) numbers; with a NULL stack and no TID pointers the argument orders agree.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120}
_MESSAGE_CAP = 4096

ChildMain = Callable[[int, int, str], NoReturn]  # (request fd, result fd, working directory)


def clone_sibling(new_pid_namespace: bool) -> int:
    """fork(), except that the child's parent is our parent and, if asked, the child is PID 1 of
    a new PID namespace: a raw clone(2) between the interpreter's own before- and after-fork
    steps (what ``os.fork`` does around fork(2)). 0 in the child, its pid in the caller."""
    number = _SYS_CLONE.get(platform.machine())
    if number is None:
        raise OSError(0, f"clone: no system call number known for {platform.machine()}")
    flags = _CLONE_PARENT | signal.SIGCHLD | (_CLONE_NEWPID if new_pid_namespace else 0)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc.syscall(ctypes.c_long(number), ctypes.c_long(flags), ctypes.c_long(0), ctypes.c_long(0),
                        ctypes.c_long(0), ctypes.c_long(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    error = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(error, f"clone: {os.strerror(error)}")
    return pid


class Zygote:
    """The fork server's end of the zygote: :meth:`spawn` a child per program."""

    def __init__(self, child_main: ChildMain, new_pid_namespace: bool, release: Callable[[], None]) -> None:
        """Fork the zygote now (call before the first program) and ask for the first child; the
        zygote calls release (which closes the server's own descriptors) and dies with the server."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                ours.close()
                release()
                _serve(theirs, child_main, new_pid_namespace)
            finally:
                os._exit(1)
        theirs.close()
        self._sock = ours
        self._sock.send(b"next")

    def spawn(self, request_fd: int, result_fd: int, workdir: str) -> int:
        """Start the waiting child on these pipe ends (the caller closes its copies) in workdir
        and have the next one cloned; the child's pid. OSError if the clone failed or the child
        died while it waited; the server exits if the zygote is gone (the trainer restarts it)."""
        try:
            answer, fds, _, _ = socket.recv_fds(self._sock, _MESSAGE_CAP, 1)
            self._sock.send(b"next")
        except OSError:
            answer, fds = b"", []
        if not answer:
            os._exit(1)
        if len(fds) != 1 or not answer.isdigit():
            for fd in fds:
                os.close(fd)
            raise OSError(0, answer.decode(errors="replace"))
        with socket.socket(fileno=fds[0]) as child:
            socket.send_fds(child, [workdir.encode()], [request_fd, result_fd])  # OSError: it died
        return int(answer)


def _serve(sock: socket.socket, child_main: ChildMain, new_pid_namespace: bool) -> NoReturn:
    """In the zygote: a new waiting child per "next", until the server goes."""
    die_with_parent()
    while True:
        try:
            if sock.recv(16) != b"next":
                os._exit(0)
        except OSError:
            os._exit(0)
        server_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = clone_sibling(new_pid_namespace)
        except OSError as exc:
            server_end.close()
            child_end.close()
            sock.send((str(exc) or "clone failed").encode())
            continue
        if pid == 0:
            try:
                sock.close()
                server_end.close()
                _await_start(child_end, child_main)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        child_end.close()
        socket.send_fds(sock, [str(pid).encode()], [server_end.fileno()])
        server_end.close()


def _await_start(sock: socket.socket, child_main: ChildMain) -> NoReturn:
    """In a waiting child: block until the server hands over the program's pipes, then run."""
    try:
        message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_CAP, 2)
    except OSError:
        os._exit(0)
    if not message or len(fds) != 2:  # the server is gone
        os._exit(0)
    sock.close()
    child_main(fds[0], fds[1], message.decode())
