# Write result lines whose fields have the wrong types (unhashable kind, dict index, grid as a
# string or dict, nested garbage) into every descriptor, before the real result.
import os

LINES = [
    b'{"kind": [], "error": "unhashable kind"}',
    b'{"kind": {}, "error": {}}',
    b'{"kind": "parse_error", "error": ["not", "a", "string"]}',
    b'{"i": {"a": 1}, "grid": [[1]]}',
    b'{"i": [0], "kind": "exception"}',
    b'{"i": 0, "kind": [1, 2], "error": null}',
    b'{"i": 0, "grid": "[[1]]"}',
    b'{"i": 0, "grid": {"0": [1]}}',
    b'{"i": 0, "grid": [[1e999]]}',
    b'{"i": 0, "grid": [[NaN]]}',
    b'{"i": 1e400, "grid": [[1]]}',
    b'{"i": -0, "grid": [[true]]}',
    b'{"i": 0, "grid": [[1]], "kind": {"nested": [[[[[]]]]]}}',
    b'{"status": "ok", "layers": []}',
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\xff\xfe\x00\x00",
]


def transform(grid):
    data = b"\n".join(LINES) + b"\n"
    for fd in range(3, 64):
        try:
            os.write(fd, data)
        except OSError:
            pass
    return [[1]]
