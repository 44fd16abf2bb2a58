# Where programs run as the trainer's user (non-root) without Landlock: open the trainer's and
# the fork server's descriptors through /proc/<pid>/fd read-only (a sibling's result pipe,
# request pipes) and read their memory and environment. The trainer's pid is filled in.
import os

TRAINER = __TEST_PID__


def transform(grid):
    opened = []
    for pid in {TRAINER, os.getppid()} - {0, os.getpid()}:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = [str(n) for n in range(64)]
        for fd in fds:
            try:
                handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            opened.append(f"{pid}/fd/{fd}")
            os.close(handle)
        for name in ("mem", "environ", "maps"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as handle:
                    if name != "mem" and handle.read(64):
                        opened.append(f"{pid}/{name}")
                    elif name == "mem":
                        opened.append(f"{pid}/mem")
            except OSError:
                pass
    if opened:
        return [[min(len(opened), 9)]]
    raise PermissionError("no descriptor or memory of the trainer or the fork server was reachable")
