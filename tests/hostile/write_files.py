# Create, overwrite, append, truncate, chmod, link: anything that changes files outside.
import os

VICTIM = "__VICTIM_DIR__"


def transform(grid):
    escaped = []
    for path in (f"{VICTIM}/new.txt", f"{VICTIM}/victim.txt", "written_in_cwd.txt", "/tmp/fp16rl_escape.txt"):
        for mode in ("w", "a", "r+"):
            try:
                with open(path, mode) as handle:
                    handle.write("pwned")
                escaped.append(f"{mode} {path}")
            except Exception:
                pass
    for name, attempt in {
        "mkdir": lambda: os.mkdir(f"{VICTIM}/newdir"),
        "symlink": lambda: os.symlink("/etc/passwd", f"{VICTIM}/link"),
        "hardlink": lambda: os.link(f"{VICTIM}/victim.txt", f"{VICTIM}/hard"),
        "truncate": lambda: os.truncate(f"{VICTIM}/victim.txt", 0),
        "chmod": lambda: os.chmod(f"{VICTIM}/victim.txt", 0o777),
        "utime": lambda: os.utime(f"{VICTIM}/victim.txt", (0, 0)),
        "mkfifo": lambda: os.mkfifo(f"{VICTIM}/fifo"),
    }.items():
        try:
            attempt()
            escaped.append(name)
        except Exception:
            pass
    if escaped:
        return [[1]]  # an OK outcome: the test fails
    raise PermissionError("every write was blocked")
