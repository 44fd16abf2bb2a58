"""Grid <-> text encoders for prompts.

Both encoders write one grid row per line and separate cells with single spaces, which is what
the default user message tells the model. ``decode(encode(g)) == g`` exactly for every valid grid.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fp16rl.config.options import GRID_ENCODERS, grid_encoder_key
from fp16rl.core.errors import ConfigError
from fp16rl.tasks.arc.data import Grid

COLOR_NAMES = ("Black", "Blue", "Red", "Green", "Yellow", "Gray", "Pink", "Orange", "Purple", "Brown")


@runtime_checkable
class GridEncoder(Protocol):
    """Turns a grid into prompt text and back."""

    name: str

    def encode(self, grid: Grid) -> str: ...

    def decode(self, text: str) -> Grid: ...


class _TokenEncoder:
    """Space-separated cell tokens, newline-separated rows; subclasses choose the cell tokens."""

    name: str
    tokens: tuple[str, ...]

    def __init__(self) -> None:
        self._values = {token: value for value, token in enumerate(self.tokens)}

    def encode(self, grid: Grid) -> str:
        return "\n".join(" ".join(self.tokens[v] for v in row) for row in grid)

    def decode(self, text: str) -> Grid:
        rows = [line.split() for line in text.strip().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{self.name}: no grid rows in text")
        width = len(rows[0])
        grid: Grid = []
        for r, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"{self.name}: row {r} has {len(row)} cells, row 0 has {width}")
            try:
                grid.append([self._values[token] for token in row])
            except KeyError as exc:
                raise ValueError(f"{self.name}: unknown cell token {exc.args[0]!r} in row {r}") from None
        return grid

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ColorNameEncoder(_TokenEncoder):
    """Cells as colour names (0 Black ... 9 Brown): the original workload's default encoding."""

    name = "color-names"
    tokens = COLOR_NAMES


class DigitEncoder(_TokenEncoder):
    """Cells as digits 0-9 separated by spaces, so most tokenizers see one token per cell."""

    name = "digits"
    tokens = tuple(str(d) for d in range(10))


def get_encoder(name: str) -> GridEncoder:
    """Encoder by name; accepts the seed CLI spelling ``ColorNameEncoder()`` and short names
    (``fp16rl.config.options.GRID_ENCODERS``). Raises ``ValueError`` for an unknown name."""
    try:
        key = grid_encoder_key(name)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return {"ColorNameEncoder": ColorNameEncoder, "DigitEncoder": DigitEncoder}[GRID_ENCODERS[key]]()
