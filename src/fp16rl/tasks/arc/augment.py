"""Task augmentation: a dihedral transform plus a colour permutation, applied to every grid of a task.

A flip (left-right) followed by k quarter turns covers all 8 symmetries of the square. Colours are
permuted with 0 (the usual background) kept fixed 90% of the time and all ten shuffled otherwise,
as in the original workload. Every augmentation comes from ``np.random.default_rng([seed, step,
index])``, so the same (seed, step, slot) gives the same augmented prompt in every run and arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fp16rl.tasks.arc.data import ArcTaskData, Grid

IDENTITY_COLORS = tuple(range(10))
KEEP_BACKGROUND_PROB = 0.9


@dataclass(frozen=True)
class Augmentation:
    """``apply``: recolour (cell c -> colors[c]), flip left-right if ``flip``, rotate ``rotations``
    quarter turns counter-clockwise (np.rot90). ``invert`` undoes it exactly."""

    flip: bool = False
    rotations: int = 0
    colors: tuple[int, ...] = IDENTITY_COLORS

    def __post_init__(self) -> None:
        if sorted(self.colors) != list(IDENTITY_COLORS):
            raise ValueError(f"colors must be a permutation of 0..9, got {self.colors}")
        if self.rotations not in range(4):
            raise ValueError(f"rotations must be 0..3, got {self.rotations}")

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.rotations == 0 and self.colors == IDENTITY_COLORS

    def apply(self, grid: Grid) -> Grid:
        g = np.asarray(self.colors)[np.asarray(grid)]
        if self.flip:
            g = np.fliplr(g)
        return np.rot90(g, self.rotations).tolist()

    def invert(self, grid: Grid) -> Grid:
        g = np.rot90(np.asarray(grid), -self.rotations)
        if self.flip:
            g = np.fliplr(g)
        return np.argsort(self.colors)[g].tolist()

    def apply_task(self, task: ArcTaskData) -> ArcTaskData:
        """A new task with every input and output grid (train and test) transformed."""
        return {
            part: [{key: self.apply(grid) for key, grid in pair.items()} for pair in pairs]
            for part, pairs in task.items()
        }

    def describe(self) -> str:
        """Compact label for sample logs, e.g. ``flip-rot1-c0913...``."""
        flip = "flip-" if self.flip else ""
        return f"{flip}rot{self.rotations}-c{''.join(map(str, self.colors))}"


def random_augmentation(rng: np.random.Generator) -> Augmentation:
    """Uniform dihedral transform and a colour permutation (background kept with prob 0.9)."""
    flip = bool(rng.integers(2))
    rotations = int(rng.integers(4))
    if rng.random() < KEEP_BACKGROUND_PROB:
        colors = (0, *(int(c) for c in rng.permutation(np.arange(1, 10))))
    else:
        colors = tuple(int(c) for c in rng.permutation(10))
    return Augmentation(flip=flip, rotations=rotations, colors=colors)


def augmentation_for(seed: int, step: int, index: int) -> Augmentation:
    """The augmentation of prompt slot ``index`` at ``step``: a pure function of its arguments."""
    return random_augmentation(np.random.default_rng([seed, step, index]))
