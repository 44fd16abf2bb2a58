# Return objects that lie: a list whose __eq__ is always true, whose __len__ says 1 and whose
# __iter__ never ends; an ndarray subclass whose tolist() claims a grid. The trainer must never
# call any of it: only plain JSON crosses the boundary.
import numpy as np


class Liar(list):
    def __eq__(self, other):
        return True

    def __len__(self):
        return 1

    def __iter__(self):
        while True:
            yield [1]


class Sneaky(np.ndarray):
    def tolist(self):
        return [[1]]


def transform(grid):
    if len(grid) > 1:
        return np.zeros((40, 40), dtype=np.int64).view(Sneaky)
    return Liar([[1]])
