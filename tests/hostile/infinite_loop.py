# Never returns: the wall-clock limit must kill it.
def transform(grid):
    while True:
        pass
