"""Atomic, durable file and directory writes: after a crash or power loss a reader finds the old
version or the new one, never half of one and never an empty file.

Atomic: everything is written under a temporary name in the same folder and renamed into place.
Durable: the data of every file is fsync'ed before the rename, and the folder holding the new name
is fsync'ed after it (a rename is only on disk once its directory entry is). New files and folders
get the usual permissions (0666/0777 less the umask), not the 0600/0700 of ``tempfile`` nor the 0600
that safetensors (>= 0.6) gives the files it writes through its own temporary file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (directories must be opened read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (bottom-up), then ``root`` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def usual_permissions(root: Path) -> None:
    """Set every file and folder under ``root`` (not ``root``) to the permissions ``open``/``mkdir``
    would give: 0666, or 0777 for folders and executables, less the umask. Symbolic links are left alone."""
    mask = _umask()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            broad = 0o777 if name in dirs or mode & 0o111 else 0o666
            os.chmod(path, broad & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success its tree is fsync'ed and renamed to ``path``.

    ``path`` must not exist or be an empty folder. If another process created it meanwhile
    (two tests preparing the same cached model), the other writer wins and ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        usual_permissions(tmp)  # before the fsync, which makes the modes durable with the data
        fsync_tree(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
