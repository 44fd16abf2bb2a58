# Forge a result line with an invalid grid before the real one.
import os


def transform(grid):
    for fd in range(3, 64):
        try:
            os.write(fd, b'{"i": 0, "grid": [[10, 11]]}\n')
        except OSError:
            pass
    return [[1]]
