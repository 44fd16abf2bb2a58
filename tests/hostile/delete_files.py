# Delete or move files and directories outside the sandbox.
import os
import shutil

VICTIM = "__VICTIM_DIR__"


def transform(grid):
    escaped = []
    for name, attempt in {
        "remove": lambda: os.remove(f"{VICTIM}/victim.txt"),
        "rename": lambda: os.rename(f"{VICTIM}/victim.txt", f"{VICTIM}/moved.txt"),
        "rmdir": lambda: os.rmdir(f"{VICTIM}/empty"),
        "rmtree": lambda: shutil.rmtree(f"{VICTIM}/sub"),
    }.items():
        try:
            attempt()
            escaped.append(name)
        except Exception:
            pass
    if escaped:
        return [[1]]
    raise PermissionError("every deletion was blocked")
