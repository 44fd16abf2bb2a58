"""The trainer's own /proc entries, where no layer keeps programs out of them.

Without the privilege drop (another uid), Landlock (no /proc in the readable set) and the mount
view (a /proc with the program alone), that is non-root without Landlock, programs run as the
trainer's user and may open any path: ``/proc/<trainer>/fd/<n>`` read-only would give them a
sibling's result pipe, ``mem`` and ``environ`` the trainer's memory and secrets. A non-dumpable
process's entries there are root's. The price, only in that setting: no core dumps and no
same-user debugger (py-spy, gdb) until the last such sandbox closes, when the old setting returns.
The fork servers, their zygotes and the programs are never dumpable (see :mod:`.server`).
"""

from __future__ import annotations

import ctypes
import threading

_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
# Any of these active keeps programs out of the trainer's /proc entries.
PROC_GUARDS = ("privilege_drop", "landlock", "mount_namespace")


def trainer_exposed(layers: dict[str, str]) -> bool:
    """Whether programs under these layers could open the trainer's /proc entries."""
    return not any(layers.get(name) == "active" for name in PROC_GUARDS)


class TrainerNotDumpable:
    """Keeps this (the trainer's) process non-dumpable while any sandbox that needs it is open."""

    _lock = threading.Lock()
    _holders = 0
    _before = 1
    _prctl = ctypes.CDLL(None, use_errno=True).prctl

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._holders == 0:
                cls._before = cls._prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
                if cls._prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
            cls._holders += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._before == 1:  # 2 (suid_dumpable) cannot be set back
                cls._prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
