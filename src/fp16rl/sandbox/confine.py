"""Every system-call-level isolation layer of the sandbox, and nothing else.

Runs only in the fork server (``server.py``) and its children, never in the trainer. The server
builds each layer's state once (:meth:`Confinement.prepare`), checks in throwaway children which
layers apply here and that the standard library still imports under them, and then confines
every program's child with :meth:`Confinement.apply` before any program byte is read.

Why each layer exists is in the package docstring and the README's threat table; the
x86_64 system-call table lives in :mod:`.syscalls`.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import struct
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from fp16rl.sandbox import syscalls
from fp16rl.sandbox.common import ACTIVE, EXIT_SERVER_GONE, SandboxLimits
from fp16rl.sandbox.readable import ReadableSet, import_path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 8, 22, 38
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_NOBODY = 65534
_NOFILE = 64
_RECURSION_LIMIT = 5000  # deep enough for recursive flood fills on 30x30 grids

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
_STATVFS_TO_MS = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: _MS_NOEXEC,
                  os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}
VIEW_WORKDIR = "/sandbox"  # the (empty, read-only) working directory inside the mount view

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_READ = (1 << 0) | (1 << 2)  # EXECUTE (mmap of libraries) | READ_FILE
_LANDLOCK_READ_DIR = 1 << 3
_LANDLOCK_ABI_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}

# What the probe imports to check that a confined child can still load modules (the first of
# each group that is not imported yet).
_SMOKE_MODULES = ("colorsys", "graphlib", "fractions", "statistics")  # pure Python, rarely preloaded
_SMOKE_EXTENSIONS = ("_csv", "array", "cmath", "_bz2")  # C extensions from lib-dynload


def check(result: int, what: str) -> int:
    """Raise OSError with errno for a failed libc call."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg: int = 0) -> None:
    check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), f"prctl({option})")


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (cleared by a uid change: call after it)."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def unshare(flag: int) -> None:
    """Move this process into a new namespace of one kind (its children, for PID)."""
    check(_libc.unshare(ctypes.c_int(flag)), "unshare")


def make_mounts_private() -> None:
    """After unshare(CLONE_NEWNS): nothing mounted here may propagate back to the host."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount({target})")


def _syscall(number: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
    """syscall(2), every integer passed as a full 64-bit long."""
    return _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


# --- Landlock ------------------------------------------------------------------------------


def landlock_ruleset(readable: ReadableSet) -> int:
    """A Landlock ruleset fd: read-only access beneath the readable set, nothing else, no TCP,
    and (ABI >= 6) no signals or abstract unix sockets beyond the program's own domain."""
    abi = check(_syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1), "landlock_create_ruleset")
    fs = _LANDLOCK_ABI_FS[max(v for v in _LANDLOCK_ABI_FS if v <= abi)]
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP with no rule: both denied
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("<QQQ", fs, net, scoped)[:size], size)
    ruleset = check(_syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")
    try:
        for path, listing_only in readable.landlock_rules():
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if listing_only:
                    access = _LANDLOCK_READ_DIR
                else:
                    access = _LANDLOCK_READ | (_LANDLOCK_READ_DIR if os.path.isdir(path) else 0)
                rule = ctypes.create_string_buffer(struct.pack("<Qi", access, fd), 12)
                check(_syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        high = fcntl.fcntl(ruleset, fcntl.F_DUPFD_CLOEXEC, 10)  # clear of a child's fds 3 and 4
    finally:
        os.close(ruleset)
    return high


# --- mount namespace: a minimal read-only view of the file system ----------------------------


def build_view(root: str, readable: ReadableSet, with_proc: bool) -> None:
    """Mount, at root, a read-only tmpfs holding only the readable set (bind-mounted read-only at
    the same paths, hidden sub-folders covered by empty mounts), an empty working directory and,
    with a PID namespace, a private /proc that shows only the program's own processes."""
    old_umask = os.umask(0o022)
    try:
        _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
        bound: list[str] = []
        for path in sorted(readable.dirs):
            if not any(_within(path, b) for b in bound):
                os.makedirs(root + path, exist_ok=True)
                _bind_read_only(path, root + path)
                bound.append(path)
        for path in readable.hidden:
            _mount("tmpfs", root + path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0555,size=4k")
        for path in sorted(readable.files):
            if not any(_within(path, b) for b in bound):
                os.makedirs(root + os.path.dirname(path), exist_ok=True)
                os.close(os.open(root + path, os.O_CREAT | os.O_WRONLY, 0o444))
                _bind_read_only(path, root + path)
        for alias, target in sorted(readable.aliases.items()):
            if not any(_within(alias, b) for b in bound) and not os.path.lexists(root + alias):
                os.makedirs(root + os.path.dirname(alias), exist_ok=True)
                os.symlink(target, root + alias)
        os.makedirs(root + VIEW_WORKDIR)
        os.makedirs(root + "/proc")
        if with_proc:
            _mount_private_proc(root + "/proc")
        _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    finally:
        os.umask(old_umask)


def _bind_read_only(source: str, target: str) -> None:
    """Bind source at target, then make that mount read-only (keeping the source's own flags)."""
    _mount(source, target, None, _MS_BIND)
    flags = os.statvfs(source).f_flag
    kept = sum(ms for st, ms in _STATVFS_TO_MS.items() if flags & st)
    _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | kept)


def _mount_private_proc(target: str) -> None:
    """procfs of our PID namespace; hidepid=invisible also hides the server (root) from programs."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for options in ("hidepid=invisible,subset=pid", "hidepid=2", None):
        try:
            _mount("proc", target, "proc", flags, options)
            return
        except OSError as exc:
            error = exc
    raise error


def enter_view(root: str) -> None:
    """pivot_root into the view and detach the old root: nothing else is reachable afterwards.

    OSError if the pivot fails (nothing changed); RuntimeError if the old root cannot be
    detached after it (then this process must not serve: its file system is half swapped).
    """
    number = _PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(0, f"pivot_root: no system call number known for {os.uname().machine}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        check(_syscall(number, b".", b"."), "pivot_root")
    except OSError:
        os.chdir(cwd)
        raise
    if _libc.umount2(b".", _MNT_DETACH) != 0:
        raise RuntimeError(f"umount2(old root) after pivot_root: {os.strerror(ctypes.get_errno())}")
    os.chdir("/")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --- privileges, seccomp --------------------------------------------------------------------


def drop_privileges(keep_read_search: bool) -> None:
    """Become uid/gid 65534 with no capabilities; CAP_DAC_READ_SEARCH is kept only when asked
    (no mount view, Landlock active): then a root-only Python install stays importable and
    Landlock, not file permissions, decides what can be read."""
    if keep_read_search:
        prctl(_PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(_NOBODY, _NOBODY, _NOBODY)
    os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    if keep_read_search:
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        keep = 1 << _CAP_DAC_READ_SEARCH
        data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable x2
        check(_libc.capset(header, data), "capset")
        prctl(_PR_SET_KEEPCAPS, 0)


def seccomp_install(prog: ctypes.Array[ctypes.c_char]) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)."""
    check(_libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(2), ctypes.c_void_p(ctypes.addressof(prog)),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


class SetupError(Exception):
    """An active layer failed to apply in a child: the program must not run."""


class Confinement:
    """One worker's prepared layers; :meth:`apply` confines a freshly forked child with them."""

    def __init__(self, limits: SandboxLimits, layers: dict[str, str], base: str) -> None:
        self.limits = limits
        self.layers = layers  # name -> "active" / "disabled (...)" / "unavailable: ..."
        self.base = base
        self.server_pid = os.getpid()
        self.ruleset_fd = -1
        self.seccomp_filter: ctypes.Array[ctypes.c_char] | None = None
        self.seccomp_prog: ctypes.Array[ctypes.c_char] | None = None
        self.view_root: str | None = None  # set while the view is built but not yet entered
        self.in_view = False
        self.force_read_search = False  # set when the Python install is unreadable to uid 65534
        self.sys_path: list[str] = list(sys.path)

    def prepare(self) -> None:
        """Build each candidate layer, probe them in throwaway children, enter the mount view.

        On entry ``layers`` holds the namespaces' fates and the disabled layers; a layer not yet
        listed (or a namespace listed active) is a candidate until it is built and probed.
        """
        if os.geteuid() != 0:
            self.layers.setdefault("privilege_drop", f"unavailable: not root, programs keep uid {os.geteuid()}")
        readable = ReadableSet()
        wanted = [name for name in ("landlock", "mount_namespace") if self.layers.get(name, ACTIVE) == ACTIVE]
        try:
            readable = ReadableSet.discover() if wanted else readable
        except OSError as exc:
            for name in wanted:
                self.layers[name] = f"unavailable: cannot list what programs may read: {exc}"
        self._attempt("landlock", lambda: setattr(self, "ruleset_fd", landlock_ruleset(readable)))
        self._attempt("seccomp", self._build_seccomp)
        self._attempt("mount_namespace", lambda: self._build_view(readable))
        self.sys_path = import_path()
        for name in ("privilege_drop", "ipc_namespace"):
            self.layers.setdefault(name, ACTIVE)
        self._settle()
        if self.layers["mount_namespace"] == ACTIVE:
            try:
                enter_view(self.view_root or "")
                self.in_view = True
            except OSError as exc:
                self.layers["mount_namespace"] = f"unavailable: {exc}"
                self._settle()
        self.view_root = None

    def _attempt(self, name: str, build: Callable[[], None]) -> None:
        """Build one layer's state if it is a candidate; it is then active until a probe fails."""
        if self.layers.get(name, ACTIVE) != ACTIVE:  # disabled, or its namespace is missing
            return
        try:
            build()
            self.layers[name] = ACTIVE
        except OSError as exc:
            self.layers[name] = f"unavailable: {exc.strerror or exc}"

    def _build_seccomp(self) -> None:
        program = syscalls.seccomp_program()
        self.seccomp_filter = ctypes.create_string_buffer(program, len(program))
        prog = struct.pack("<HxxxxxxQ", len(program) // 8, ctypes.addressof(self.seccomp_filter))
        self.seccomp_prog = ctypes.create_string_buffer(prog, len(prog))

    def _build_view(self, readable: ReadableSet) -> None:
        root = os.path.join(self.base, f"view-{os.getpid()}-{id(self):x}")
        os.mkdir(root, 0o755)
        build_view(root, readable, with_proc=self.layers.get("pid_namespace") == ACTIVE)
        self.view_root = root

    def _settle(self) -> None:
        """Probe until every layer marked active applies and imports still work under them all.

        A layer that fails to apply becomes unavailable. If imports fail, the cheapest remedy
        comes first: keeping CAP_DAC_READ_SEARCH (a root-only Python install), which widens
        nothing that Landlock or the view still confine. Otherwise the one layer whose removal
        alone makes imports work is given up, with the reason recorded; if there is none, the
        worker refuses to start rather than run programs that cannot import.
        """
        report = self._probe()
        if report.get("smoke") == "ok":
            return
        if self.layers.get("privilege_drop") == ACTIVE and not self.keep_read_search():
            self.force_read_search = True
            if self._probe().get("smoke") == "ok":
                return
            self.force_read_search = False  # it did not help: no reason to keep the capability
        for suspect in ("mount_namespace", "landlock", "seccomp", "privilege_drop"):
            if self.layers.get(suspect) != ACTIVE:
                continue
            self.layers[suspect] = "suspect"
            retry = self._probe()
            if retry.get("smoke") == "ok":
                reason = report.get("smoke")
                self.layers[suspect] = f"unavailable: the standard library does not import under it ({reason})"
                return
            self.layers[suspect] = ACTIVE
        raise RuntimeError(f"a confined child cannot import the standard library: {report.get('smoke')}")

    def _probe(self) -> dict[str, Any]:
        """Apply every active layer in a throwaway child (inside the view, if one is being
        built) and check that the standard library and numpy still work there."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            report: dict[str, Any] = {}
            try:
                os.close(read_fd)
                if self.view_root is not None and self.layers.get("mount_namespace") == ACTIVE:
                    os.chroot(self.view_root)
                report["layers"] = self.apply(self.workdir(), (write_fd,), strict=False)
                report["smoke"] = _smoke_test()
            except BaseException as exc:  # noqa: BLE001 - reported to the server instead
                report["smoke"] = f"setting up the layers failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                os.write(write_fd, json.dumps(report).encode())
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read(1 << 16)
        os.waitpid(pid, 0)
        try:
            report = json.loads(data)
        except ValueError:
            return {"smoke": "the probe child gave no report"}
        if not isinstance(report, dict):
            return {"smoke": "the probe child gave no report"}
        for name, status in report.get("layers", {}).items():  # failed to apply: unavailable
            if self.layers.get(name) == ACTIVE and status != ACTIVE:
                self.layers[name] = str(status)
        return report

    def keep_read_search(self) -> bool:
        """Whether the privilege drop keeps CAP_DAC_READ_SEARCH (see :func:`drop_privileges`)."""
        no_view = self.layers.get("mount_namespace") != ACTIVE
        return self.force_read_search or (no_view and self.layers.get("landlock") == ACTIVE)

    def workdir(self) -> str:
        """The program's working directory: the view's empty one, or a fresh folder in base."""
        if self.layers.get("mount_namespace") == ACTIVE:
            return VIEW_WORKDIR
        path = tempfile.mkdtemp(dir=self.base)
        os.chmod(path, 0o755)
        return path

    def apply(self, workdir: str, keep_fds: tuple[int, ...], strict: bool) -> dict[str, str]:
        """Confine this (child) process; returns each optional layer's status.

        Mandatory steps raise; an optional layer marked active raises :class:`SetupError` when
        strict (a real program) and is reported as unavailable otherwise (the probe).
        """
        report: dict[str, str] = {}

        def layer(name: str, apply: Callable[[], None]) -> None:
            if self.layers.get(name) != ACTIVE:
                return
            try:
                apply()
                report[name] = ACTIVE
            except OSError as exc:
                if strict:
                    raise SetupError(f"{name}: {exc}") from None
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
        layer("ipc_namespace", lambda: unshare(CLONE_NEWIPC))  # its own, gone when it exits
        layer("privilege_drop", lambda: drop_privileges(self.keep_read_search()))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # ignored for root: see the layers
        die_with_parent()  # after the uid change, which clears it
        # The server died before we could tie our life to it? Then our parent changed. A child
        # that is init of its own PID namespace sees parent 0 either way, but lives inside the
        # server's namespace, which ends with the server.
        if os.getppid() not in (self.server_pid, 0):
            os._exit(EXIT_SERVER_GONE)
        prctl(_PR_SET_DUMPABLE, 0)  # no ptrace or /proc/<pid>/mem by other programs of our uid
        prctl(_PR_SET_NO_NEW_PRIVS, 1)
        layer("landlock", lambda: check(_syscall(_SYS_LANDLOCK_RESTRICT_SELF, self.ruleset_fd, 0),
                                        "landlock_restrict_self"))
        keep = sorted(set(keep_fds) | {0, 1, 2})
        for low, high in zip([-1, *keep], [*keep, 1 << 16], strict=True):
            if low + 1 < high:  # closerange(n, n) closes everything on Python 3.11 (close_range)
                os.closerange(low + 1, high)
        layer("seccomp", lambda: seccomp_install(self.seccomp_prog))  # type: ignore[arg-type]
        sys.setrecursionlimit(_RECURSION_LIMIT)
        sys.dont_write_bytecode = True
        for path in sys.path:
            if path not in self.sys_path:  # a cached listing of site-packages would mislead imports
                sys.path_importer_cache.pop(path, None)
        sys.path[:] = self.sys_path  # the standard library only: numpy is already imported
        return report


def _smoke_test() -> str:
    """'ok' if a confined child can import pure-Python and C-extension standard modules and use
    numpy; otherwise the first error."""
    import importlib

    import numpy as np

    try:
        for group in (_SMOKE_MODULES, _SMOKE_EXTENSIONS):
            name = next((m for m in group if m not in sys.modules), group[0])
            importlib.import_module(name)
        if int(np.arange(4).reshape(2, 2).T.sum()) != 6:
            return "numpy computed a wrong sum"
        return "ok"
    except BaseException as exc:  # noqa: BLE001 - reported, not raised: the probe must answer
        return f"{type(exc).__name__}: {exc}"[:300]
