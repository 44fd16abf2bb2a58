# Unbounded recursion.
def dig(depth):
    return dig(depth + 1) + 1


def transform(grid):
    return dig(0)
