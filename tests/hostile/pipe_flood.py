# Write garbage into every inherited file descriptor (the result pipe among them).
import os


def transform(grid):
    junk = b"\xff{not json" * 100_000
    for fd in range(3, 64):
        for _ in range(10):
            try:
                os.write(fd, junk)
            except OSError:
                break
    return [[1]]
