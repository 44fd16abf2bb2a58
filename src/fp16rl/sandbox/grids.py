"""Code extraction and the two grid checks, one on each side of the boundary.

* :func:`normalize_output` runs in the confined child on whatever ``transform`` returned (lists,
  tuples, numpy arrays, numpy scalars, integral floats) and turns it into plain JSON-ready lists.
  It calls into program objects, which is acceptable only because it runs inside the sandbox.
* :func:`check_grid` runs in the trainer on parsed JSON. It accepts nothing but exact ``list``
  and ``int`` values, so it never calls a method of an object a program could have shaped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fp16rl.sandbox.common import Grid


def extract_code(completion: str) -> str | None:
    """The code of the first ```python block, or None if there is none.

    The code starts on the line after the opening fence (anything after ``python`` on that
    line, such as ``3``, is ignored) and ends at the next triple backtick or, for an unclosed
    block (a completion cut at the token limit), at the end of the text, as in the original.
    ``py`` or bare fences do not count.
    """
    start = completion.find("```python")
    if start < 0:
        return None
    newline = completion.find("\n", start)
    if newline < 0:
        return ""
    end = completion.find("```", newline + 1)
    return completion[newline + 1 :] if end < 0 else completion[newline + 1 : end]


def check_grid(value: Any, max_side: int) -> tuple[Grid | None, str | None]:
    """Trainer side: (a fresh copy, None) if value is a valid grid of parsed JSON, else (None, why).

    Valid: a non-empty list of equally long non-empty lists of ints 0..9, sides <= max_side.
    Only exact ``list`` and ``int`` types pass (``bool`` is not ``int`` here), and sizes are
    checked before anything is iterated, so the cost is bounded by max_side squared.
    """
    if type(value) is not list:
        return None, f"expected a list of rows, got {_json_type(value)}"
    if not value:
        return None, "empty grid"
    if len(value) > max_side:
        return None, f"{len(value)} rows, at most {max_side} allowed"
    grid: Grid = []
    for r, row in enumerate(value):
        if type(row) is not list:
            return None, f"row {r} is {_json_type(row)}, not a list"
        if not row:
            return None, f"row {r} is empty"
        if len(row) > max_side:
            return None, f"row {r} has {len(row)} cells, at most {max_side} allowed"
        if grid and len(row) != len(grid[0]):
            return None, f"ragged grid: row {r} has {len(row)} cells, row 0 has {len(grid[0])}"
        for c, cell in enumerate(row):
            if type(cell) is not int or not 0 <= cell <= 9:
                shown = repr(cell)[:20] if type(cell) in (int, float, bool, str) else _json_type(cell)
                return None, f"cell ({r}, {c}) is {shown}, not an int in 0..9"
        grid.append(list(row))
    return grid, None


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (never calls into the value)."""
    names = {dict: "object", list: "array", str: "str", int: "int", float: "float", bool: "bool"}
    return names.get(type(value), "null" if value is None else "unknown")


def normalize_output(obj: Any, max_side: int) -> tuple[Grid | None, str | None]:
    """Child side: (plain list-of-int-lists, None) for a valid grid, else (None, reason).

    Rows may be lists, tuples or 1-D arrays; a 2-D numpy array is accepted (through
    ``np.asarray``, so an ndarray subclass's own methods are not used); integral floats count as
    ints (``np.zeros((h, w))`` is float64), bools do not. Container types must be exactly list,
    tuple or ndarray, and lengths are checked before iterating, so a lying ``__len__`` or an
    endless ``__iter__`` of a list subclass is rejected instead of looping.
    """
    if isinstance(obj, np.ndarray):
        obj = np.asarray(obj)
        if obj.ndim != 2:
            return None, f"expected a 2-D grid, got a {obj.ndim}-D array"
        if 0 in obj.shape:
            return None, "empty grid"
        if max(obj.shape) > max_side:
            return None, f"grid is {obj.shape[0]}x{obj.shape[1]}, sides must be <= {max_side}"
        obj = obj.tolist()
    if type(obj) not in (list, tuple):
        return None, f"expected a list of rows, got {type(obj).__name__}"
    if not obj:
        return None, "empty grid"
    if len(obj) > max_side:
        return None, f"{len(obj)} rows, at most {max_side} allowed"
    grid: Grid = []
    for r, row in enumerate(obj):
        if type(row) is np.ndarray and row.ndim == 1 and row.size <= max_side:
            row = row.tolist()
        if type(row) not in (list, tuple):
            return None, f"row {r} is {type(row).__name__}, not a list"
        if not row:
            return None, f"row {r} is empty"
        if len(row) > max_side:
            return None, f"row {r} has {len(row)} cells, at most {max_side} allowed"
        if grid and len(row) != len(grid[0]):
            return None, f"ragged grid: row {r} has {len(row)} cells, row 0 has {len(grid[0])}"
        cells = []
        for c, value in enumerate(row):
            cell = _cell(value)
            if cell is None:
                return None, f"cell ({r}, {c}) is {_show(value)}, not an int in 0..9"
            cells.append(cell)
        grid.append(cells)
    return grid, None


def _cell(value: Any) -> int | None:
    """The colour as a plain int, or None if value is not an integral number in 0..9."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        number = int(value)
    else:
        return None
    return number if type(number) is int and 0 <= number <= 9 else None


def _show(value: Any) -> str:
    """A short description of a rejected cell (repr only for built-in scalar types)."""
    if type(value) in (int, float, bool, str) or isinstance(value, (np.integer, np.floating, np.bool_)):
        return repr(value)[:20]
    return type(value).__name__
