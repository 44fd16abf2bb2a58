# Report a result for every grid, then leave with an odd exit status before transform runs:
# the exit status the server observed must win over the forged lines.
import os

for fd in range(3, 64):
    try:
        os.write(fd, b"".join(b'{"i":%d,"grid":[[1]]}\n' % i for i in range(64)))
    except OSError:
        pass
os._exit(3)


def transform(grid):
    return [[1]]
