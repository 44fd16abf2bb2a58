# Return a gigantic list: rejected by size before any cell is looked at.
def transform(grid):
    row = [1] * 10_000_000
    return [row] * 1000
