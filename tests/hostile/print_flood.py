# Print without end: output must not reach the protocol, the loop must time out.
import sys


def transform(grid):
    while True:
        print("x" * 10_000)
        sys.stderr.write("y" * 10_000)
