# Report a result for every grid through every descriptor, then never finish: the timeout the
# server observed must win over the forged lines.
import os

for fd in range(3, 64):
    try:
        os.write(fd, b"".join(b'{"i":%d,"grid":[[1]]}\n' % i for i in range(64)))
    except OSError:
        pass


def transform(grid):
    while True:
        pass
