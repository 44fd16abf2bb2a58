# Read other processes through /proc: the fork server's and the trainer's environment, command
# line, memory maps and memory, and every descriptor this process can see.
import os

TRAINER = __TEST_PID__


def transform(grid):
    got = []
    for pid in (1, os.getppid(), TRAINER):
        for name in ("environ", "cmdline", "maps", "mem", "status", "stack"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as handle:
                    if handle.read(64):
                        got.append(f"{pid}/{name}")
            except Exception:
                pass
    try:
        got += [f"fd {fd}" for fd in os.listdir("/proc/self/fd") if int(fd) > 4]
    except Exception:
        pass
    if got:
        return [[min(len(got), 9)]]
    raise PermissionError("nothing in /proc was readable")
