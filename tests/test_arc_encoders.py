"""Grid encoders: exact round trips and the names the CLI accepts."""

from __future__ import annotations

import numpy as np
import pytest

from fp16rl.tasks.arc.encoders import COLOR_NAMES, ColorNameEncoder, DigitEncoder, get_encoder

ENCODERS = [ColorNameEncoder(), DigitEncoder()]
ALL_COLORS = [list(range(10)), list(range(9, -1, -1))]
BIG = np.random.default_rng(0).integers(0, 10, size=(30, 30)).tolist()


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda e: e.name)
@pytest.mark.parametrize("grid", [ALL_COLORS, [[7]], BIG, [[1, 2, 3]], [[4], [5]]], ids=["all", "1x1", "30x30", "row", "col"])
def test_round_trip(encoder, grid) -> None:
    assert encoder.decode(encoder.encode(grid)) == grid


def test_formats() -> None:
    assert ColorNameEncoder().encode([[0, 1], [9, 5]]) == "Black Blue\nBrown Gray"
    assert DigitEncoder().encode([[0, 1], [9, 5]]) == "0 1\n9 5"
    assert ColorNameEncoder().encode([list(range(10))]).split() == list(COLOR_NAMES)


def test_decode_errors() -> None:
    with pytest.raises(ValueError, match="unknown cell token 'Teal'"):
        ColorNameEncoder().decode("Black Teal")
    with pytest.raises(ValueError, match="row 1 has 1 cells"):
        DigitEncoder().decode("1 2\n3")


@pytest.mark.parametrize("name", ["ColorNameEncoder()", "ColorNameEncoder", "color-names", "color_names", "colors"])
def test_color_names_spellings(name: str) -> None:
    assert isinstance(get_encoder(name), ColorNameEncoder)


@pytest.mark.parametrize("name", ["DigitEncoder()", "digits"])
def test_digit_spellings(name: str) -> None:
    assert isinstance(get_encoder(name), DigitEncoder)


def test_unknown_encoder() -> None:
    with pytest.raises(ValueError, match="unknown grid encoder 'Hex'"):
        get_encoder("Hex")
