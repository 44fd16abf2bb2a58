# Find the fork server's report on the previous program (exit status, peak memory, CPU time),
# which that program can steer (here: it exited with code 77): in the frames above transform,
# in every object the garbage collector tracks (report dicts, wait4's rusage), and as JSON
# text in raw memory (anonymous mappings, or the 16 MiB around tracked objects without /proc).
import ctypes
import gc
import os
import re
import sys
import time

KEY = "maxrss" + "_kb"
TEXT = re.compile(rb'"' + KEY.encode() + rb'": ?\d+, ?"cpu_s": ?[0-9.e-]+(?:, ?"code": ?(\d+))?')
PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
DEADLINE = time.monotonic() + 0.5  # well inside the time limit
FOUND = None


def in_objects():
    roots = []
    frame = sys._getframe()
    while frame is not None:
        roots += list(frame.f_locals.values())
        frame = frame.f_back
    roots += gc.get_objects()
    for obj in roots:
        if isinstance(obj, dict) and KEY in obj:
            return f"report {obj.get('code', obj.get('signal'))}"
        if type(obj).__name__ == "struct_rusage" or (type(obj) is tuple and len(obj) == 3
                                                     and type(obj[2]).__name__ == "struct_rusage"):
            return "rusage"
    return None


def regions():
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if fields[1].startswith("rw") and (len(fields) < 6 or fields[5] == "[heap]"):
                    yield start, end, True
        return
    except OSError:
        pass
    for centre in sorted({id(o) >> 24 for o in gc.get_objects()[:50000]}):
        yield max(centre - 1, 0) << 24, (centre + 2) << 24, False


def in_memory():
    probe_r, probe_w = os.pipe()
    for start, end, mapped in regions():
        address = start
        while address < end and time.monotonic() < DEADLINE:
            if mapped or libc.write(probe_w, address, 1) == 1:
                if not mapped:
                    os.read(probe_r, 1)
                size = min(end - address, 1 << 20) if mapped else PAGE
                found = TEXT.search(ctypes.string_at(address, size))
                if found:
                    return f"json {found.group(1)}"
                address += size
            else:
                address += PAGE
    return None


def transform(grid):
    global FOUND
    if FOUND is None:  # once, whatever the number of grids
        FOUND = in_objects() or in_memory() or ""
    if FOUND:
        return [[len(FOUND) % 10]]
    raise LookupError("no report on an earlier program was reachable")
