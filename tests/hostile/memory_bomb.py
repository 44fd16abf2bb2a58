# Ask for far more memory than the limit, through numpy and plain Python.
import numpy as np


def transform(grid):
    big = np.ones((100_000, 100_000), dtype=np.int64)  # 80 GB
    blob = bytearray(50 * 2**30)
    return big[:3, :3].tolist() + [list(blob[:3])]
