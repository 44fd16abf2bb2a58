# Start a shell (subprocess, exec) that would write outside the sandbox.
import os
import subprocess


def transform(grid):
    target = "__VICTIM_DIR__/spawned.txt"
    for attempt in (
        lambda: subprocess.run(["/bin/sh", "-c", f"echo pwned > {target}"], check=True),
        lambda: os.system(f"echo pwned > {target}"),
        lambda: os.execv("/bin/sh", ["sh", "-c", f"echo pwned > {target}"]),
    ):
        try:
            attempt()
        except Exception:
            pass
    raise PermissionError("no process could be started")
