# Report a result for every grid, then crash the interpreter (a segmentation fault): the
# signal the server observed must win over the forged lines.
import ctypes
import os

for fd in range(3, 64):
    try:
        os.write(fd, b"".join(b'{"i":%d,"grid":[[1]]}\n' % i for i in range(64)))
    except OSError:
        pass
ctypes.string_at(8, 1)  # reading address 8 faults


def transform(grid):
    return [[1]]
