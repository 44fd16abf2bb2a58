"""The seccomp filter: an allow list of the x86_64 system calls a ``transform`` needs.

An allow list, not a deny list, because the kernel keeps adding calls (``setxattrat``,
``removexattrat`` and ``file_setattr`` arrived in 6.13-6.17 and went straight past the old deny
list). Anything not listed fails with ENOSYS, as if the kernel were older, so libraries take
their fallback paths; a few calls a program plausibly tries on purpose (processes, sockets,
signals, file changes) fail with EPERM so that Python raises PermissionError. Some calls are
allowed only with safe arguments: ``clone`` for threads, ``open``/``openat`` for reading, a
handful of ``fcntl`` and ``ioctl`` commands (no F_SETOWN/F_SETSIG, O_ASYNC, leases, locks or
directory notifications, which deliver signals or talk to other processes), ``prlimit64`` to read,
``futex`` with FUTEX_PRIVATE_FLAG only (a shared futex on a read-only mapping of a file every
program can open is one word shared by all of them: a channel; glibc and CPython use private
futexes unless a lock is explicitly process-shared, and pthread_join's one shared wait loops on
the EINVAL it gets), ``preadv2``/``pwritev2`` without flags (RWF_NOWAIT tells which file pages
are in the page cache, as ``mincore`` would; the others get EOPNOTSUPP, what a kernel without a
flag answers). ``getrusage`` is not allowed either: its fault and block-input counts reveal the
same residency.

Other architectures get no seccomp layer rather than a wrong table (reported as unavailable).
"""

from __future__ import annotations

import os
import platform
from typing import Any

# Allowed unconditionally: memory, reading already-open or read-only files, file metadata
# (hidden outside the readable set by the mount view), time, signals to oneself, threads' needs.
ALLOW = {
    "read": 0, "write": 1, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7, "lseek": 8,
    "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
    "pipe": 22, "select": 23, "sched_yield": 24, "mremap": 25, "msync": 26, "madvise": 28, "dup": 32,
    "dup2": 33, "pause": 34, "nanosleep": 35, "getitimer": 36, "alarm": 37, "setitimer": 38,
    "getpid": 39, "exit": 60, "uname": 63, "getdents": 78, "getcwd": 79, "chdir": 80, "fchdir": 81,
    "readlink": 89, "umask": 95, "gettimeofday": 96, "getrlimit": 97, "times": 100,
    "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108, "getppid": 110, "getgroups": 115,
    "getresuid": 118, "getresgid": 120, "rt_sigpending": 127, "rt_sigtimedwait": 128,
    "rt_sigsuspend": 130, "sigaltstack": 131, "gettid": 186, "time": 201,
    "sched_getaffinity": 204, "getdents64": 217, "set_tid_address": 218, "restart_syscall": 219,
    "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231,
    "newfstatat": 262, "readlinkat": 267, "faccessat": 269, "pselect6": 270, "ppoll": 271,
    "set_robust_list": 273, "dup3": 292, "pipe2": 293, "preadv": 295, "pwritev": 296, "getcpu": 309,
    "getrandom": 318, "statx": 332, "rseq": 334, "close_range": 436,
    "faccessat2": 439,
}
# Refused with EPERM (a clear PermissionError); everything else unlisted gets ENOSYS.
EPERM = {
    "socket": 41, "socketpair": 53, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "creat": 85, "truncate": 76, "ftruncate": 77,
    "unlink": 87, "unlinkat": 263, "rename": 82, "renameat": 264, "renameat2": 316, "rmdir": 84,
    "mkdir": 83, "mkdirat": 258, "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266,
    "mknod": 133, "mknodat": 259, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235,
    "utimensat": 280, "futimesat": 261, "setrlimit": 160, "unshare": 272, "setns": 308, "mount": 165,
    "chroot": 161, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "flock": 73,
}
CLONE, OPEN, OPENAT, FCNTL, IOCTL, PRLIMIT64, FUTEX, PREADV2, PWRITEV2 = 56, 2, 257, 72, 16, 302, 202, 327, 328
_FUTEX_PRIVATE_FLAG = 128
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_O_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0x400000  # __O_TMPFILE
_O_ASYNC = 0o20000
# F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_DUPFD_CLOEXEC, F_GETPIPE_SZ; F_SETFL only without O_ASYNC.
_FCNTL_ALLOWED = (0, 1, 2, 3, 1030, 1032)
_F_SETFL = 4
# TCGETS (isatty), TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX.
_IOCTL_ALLOWED = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _EINVAL, _ENOSYS, _EOPNOTSUPP = 1, 22, 38, 95


def _arg_lo(i: int) -> int:
    """Offset of the low 32 bits of argument i in struct seccomp_data (little endian)."""
    return 16 + 8 * i


def seccomp_program() -> bytes:
    """The BPF program (x86_64): allow list, argument checks, EPERM list, ENOSYS otherwise."""
    if platform.machine() != "x86_64":
        raise OSError(0, f"seccomp table only for x86_64 (this is {platform.machine()})")
    special = {CLONE: "clone", OPEN: "open1", OPENAT: "open2", FCNTL: "fcntl", IOCTL: "ioctl", PRLIMIT64: "prlimit",
               FUTEX: "futex", PREADV2: "rwf", PWRITEV2: "rwf"}
    code: list[tuple[int, Any, Any, int]] = [  # (op, jump-if-true, jump-if-false, k); labels as str
        (_LD_W_ABS, 0, 0, 4),  # arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),  # a foreign ABI (int 0x80): no table to check
        (_LD_W_ABS, 0, 0, 0),  # system call number
        (_JGE_K, "eperm", 0, _X32_BIT),  # the x32 ABI
        *[(_JEQ_K, "allow", 0, nr) for nr in ALLOW.values()],
        *[(_JEQ_K, label, 0, nr) for nr, label in special.items()],
        *[(_JEQ_K, "eperm", 0, nr) for nr in EPERM.values()],
        (_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),
    ]
    labels: dict[str, int] = {}

    def block(name: str, *instructions: tuple[int, Any, Any, int]) -> None:
        labels[name] = len(code)
        code.extend(instructions)

    block("clone", (_LD_W_ABS, 0, 0, _arg_lo(0)), (_JSET_K, "eperm", 0, _CLONE_NAMESPACES),
          (_JSET_K, "allow", "eperm", _CLONE_THREAD))
    block("open1", (_LD_W_ABS, 0, 0, _arg_lo(1)), (_JSET_K, "eperm", "allow", _O_WRITE))
    block("open2", (_LD_W_ABS, 0, 0, _arg_lo(2)), (_JSET_K, "eperm", "allow", _O_WRITE))
    block("fcntl", (_LD_W_ABS, 0, 0, _arg_lo(1)), (_JEQ_K, "setfl", 0, _F_SETFL),
          *[(_JEQ_K, "allow", 0, cmd) for cmd in _FCNTL_ALLOWED], (_RET_K, 0, 0, _RET_ERRNO | _EPERM))
    block("setfl", (_LD_W_ABS, 0, 0, _arg_lo(2)), (_JSET_K, "eperm", "allow", _O_ASYNC))
    block("ioctl", (_LD_W_ABS, 0, 0, _arg_lo(1)),
          *[(_JEQ_K, "allow", 0, cmd) for cmd in _IOCTL_ALLOWED], (_RET_K, 0, 0, _RET_ERRNO | _EPERM))
    block("prlimit", (_LD_W_ABS, 0, 0, _arg_lo(0)), (_JEQ_K, 0, "eperm", 0),  # own process only
          (_LD_W_ABS, 0, 0, _arg_lo(2)), (_JEQ_K, 0, "eperm", 0),  # new limit NULL: a read
          (_LD_W_ABS, 0, 0, _arg_lo(2) + 4), (_JEQ_K, "allow", "eperm", 0))
    block("futex", (_LD_W_ABS, 0, 0, _arg_lo(1)), (_JSET_K, "allow", 0, _FUTEX_PRIVATE_FLAG),
          (_RET_K, 0, 0, _RET_ERRNO | _EINVAL))
    block("rwf", (_LD_W_ABS, 0, 0, _arg_lo(5)), (_JEQ_K, "allow", 0, 0),  # rwf_t is an int: low half
          (_RET_K, 0, 0, _RET_ERRNO | _EOPNOTSUPP))
    block("allow", (_RET_K, 0, 0, _RET_ALLOW))  # last: BPF only jumps forward
    block("eperm", (_RET_K, 0, 0, _RET_ERRNO | _EPERM))
    out = bytearray()
    for pc, (op, jt, jf, k) in enumerate(code):
        jt, jf = (labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise AssertionError(f"BPF jump out of range at instruction {pc}")
        out += (op).to_bytes(2, "little") + bytes([jt, jf]) + k.to_bytes(4, "little")
    return bytes(out)
