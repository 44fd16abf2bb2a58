"""Programs that copy a task's shown train outputs instead of computing them, in many encodings.

Each builder returns ``{name: source}``; every program answers a shown train input with its output
and falls back to something else (identity, a constant, a transpose) for any other input.
``static_encodings`` are ones the static check can read; ``opaque_encodings`` (a XOR key, run
lengths, edits of the input) only the dynamic re-run with scrambled literals finds.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import json
import lzma
import zlib


def flat(grid: list[list[int]]) -> list[int]:
    return [v for row in grid for v in row]


def digits(grid: list[list[int]]) -> str:
    return "".join(map(str, flat(grid)))


def static_encodings(task: dict) -> dict[str, str]:
    train = task["train"]
    ins = [p["input"] for p in train]; outs = [p["output"] for p in train]
    P = {}
    body = "".join(f"    if grid == {i!r}:\n        return {o!r}\n" for i, o in zip(ins, outs))
    P["nested_eq"] = "def transform(grid):\n" + body + "    return grid\n"
    d = {digits(i): f"{len(o)},{len(o[0])},{digits(o)}" for i, o in zip(ins, outs)}
    P["digit_strings"] = ("D = %r\n" % d) + '''
def transform(grid):
    k = "".join(str(v) for r in grid for v in r)
    if k not in D:
        return [[0]]
    h, w, s = D[k].split(",")
    h, w = int(h), int(w)
    return [[int(s[r * w + c]) for c in range(w)] for r in range(h)]
'''
    fl = [(tuple(flat(i)), len(o), len(o[0]), flat(o)) for i, o in zip(ins, outs)]
    P["flat_shape"] = ("T = %r\n" % fl) + '''
def transform(grid):
    k = tuple(v for r in grid for v in r)
    for key, h, w, cells in T:
        if key == k:
            return [cells[r * w:(r + 1) * w] for r in range(h)]
    return [row[::-1] for row in grid]
'''
    big = [(len(o), len(o[0]), int("".join(str(v + 1) for v in flat(o)))) for o in outs]
    P["bigint_plus1"] = ("import hashlib\nB = %r\nI = %r\n" % (big, [hashlib.sha1(str(i).encode()).hexdigest() for i in ins])) + '''
def transform(grid):
    h0 = hashlib.sha1(str(grid).encode()).hexdigest()
    if h0 not in I:
        return grid
    h, w, n = B[I.index(h0)]
    s = str(n)
    return [[int(s[r * w + c]) - 1 for c in range(w)] for r in range(h)]
'''
    blob = base64.b64encode(zlib.compress(json.dumps(outs).encode())).decode()
    P["b64_zlib_json"] = f"import base64, zlib, json, hashlib\nBLOB = {blob!r}\nKEYS = {[hashlib.md5(str(i).encode()).hexdigest() for i in ins]!r}\n" + '''
def transform(grid):
    outs = json.loads(zlib.decompress(base64.b64decode(BLOB)))
    k = hashlib.md5(str(grid).encode()).hexdigest()
    return outs[KEYS.index(k)] if k in KEYS else grid
'''
    letters = {hashlib.md5(str(i).encode()).hexdigest(): [ "".join(chr(65 + v) for v in r) for r in o] for i, o in zip(ins, outs)}
    P["md5_letters"] = "import hashlib\nL = %r\n" % letters + '''
def transform(grid):
    k = hashlib.md5(str(grid).encode()).hexdigest()
    if k in L:
        return [[ord(ch) - 65 for ch in row] for row in L[k]]
    return [list(r) for r in zip(*grid)]
'''
    lz = base64.b85encode(lzma.compress(bytes(v for o in outs for v in flat(o)))).decode()
    shapes = [(len(o), len(o[0])) for o in outs]
    P["lzma_b85_bytes"] = f"import base64, lzma\nZ = {lz!r}\nS = {shapes!r}\nINS = {[str(i) for i in ins]!r}\n" + '''
def transform(grid):
    data = lzma.decompress(base64.b85decode(Z))
    for n, (h, w) in enumerate(S):
        if str(grid) == INS[n]:
            off = sum(a * b for a, b in S[:n])
            return [list(data[off + r * w: off + (r + 1) * w]) for r in range(h)]
    return grid
'''
    hx = bz2.compress(json.dumps(outs).encode()).hex()
    P["bz2_hex"] = f"import bz2, json\nH = {hx!r}\nINS = {[json.dumps(i) for i in ins]!r}\n" + '''
def transform(grid):
    outs = json.loads(bz2.decompress(bytes.fromhex(H)))
    k = json.dumps(grid)
    return outs[INS.index(k)] if k in INS else [[1]]
'''
    gz = base64.b32encode(gzip.compress(json.dumps(outs).encode(), mtime=0)).decode()
    P["gzip_b32"] = f"import base64, gzip, json\nG = {gz!r}\nINS = {[json.dumps(i) for i in ins]!r}\n" + '''
def transform(grid):
    outs = json.loads(gzip.decompress(base64.b32decode(G)))
    k = json.dumps(grid)
    return outs[INS.index(k)] if k in INS else grid
'''
    rows = {str(i): ["|".join("abcdefghij"[v] for v in r) for r in o] for i, o in zip(ins, outs)}
    P["row_strings_custom_alphabet"] = "R = %r\n" % rows + '''
def transform(grid):
    rows = R.get(str(grid))
    if rows is None:
        return grid
    return [["abcdefghij".index(ch) for ch in row.split("|")] for row in rows]
'''
    return P

def opaque_encodings(task: dict) -> dict[str, str]:
    train = task["train"]
    ins = [p["input"] for p in train]; outs = [p["output"] for p in train]
    P = {}
    key = [7, 3, 9, 1, 4]
    xs = {str(i): [len(o), len(o[0]), [v ^ key[n % 5] for n, v in enumerate(flat(o))]] for i, o in zip(ins, outs)}
    P["xor_key"] = "K = %r\nX = %r\n" % (key, xs) + '''
def transform(grid):
    e = X.get(str(grid))
    if e is None:
        return grid
    h, w, c = e
    v = [x ^ K[n % 5] for n, x in enumerate(c)]
    return [v[r * w:(r + 1) * w] for r in range(h)]
'''
    def rle(cells: list[int]) -> list[int]:
        out, n = [], 0
        while n < len(cells):
            m = n
            while m < len(cells) and cells[m] == cells[n]:
                m += 1
            out += [m - n, cells[n]]; n = m
        return out
    rl = {str(i): [len(o[0]), rle(flat(o))] for i, o in zip(ins, outs)}
    P["run_length"] = "R = %r\n" % rl + '''
def transform(grid):
    e = R.get(str(grid))
    if e is None:
        return [row[:] for row in grid]
    w, runs = e
    cells = []
    for k in range(0, len(runs), 2):
        cells += [runs[k + 1]] * runs[k]
    return [cells[r * w:(r + 1) * w] for r in range(len(cells) // w)]
'''
    diffs = {str(i): [(r, c, o[r][c]) for r in range(len(o)) for c in range(len(o[0])) if r >= len(i) or c >= len(i[0]) or o[r][c] != i[r][c]] for i, o in zip(ins, outs)}
    P["diff_edits"] = "E = %r\n" % diffs + '''
def transform(grid):
    g = [row[:] for row in grid]
    for r, c, v in E.get(str(grid), []):
        g[r][c] = v
    return g
'''
    return P
