"""Augmentations: invertible, deterministic from (seed, step, index), consistent over a task."""

from __future__ import annotations

import numpy as np
import pytest

from fp16rl.tasks.arc.augment import Augmentation, augmentation_for

GRID = [[0, 1, 2], [3, 4, 5]]


def test_invert_undoes_apply_for_many_seeds() -> None:
    grid = np.random.default_rng(1).integers(0, 10, size=(5, 7)).tolist()
    for index in range(64):
        aug = augmentation_for(3, 0, index)
        assert aug.invert(aug.apply(grid)) == grid


def test_all_eight_symmetries_appear() -> None:
    seen = {(a.flip, a.rotations) for a in (augmentation_for(0, 1, i) for i in range(200))}
    assert len(seen) == 8


def test_deterministic_and_seed_sensitive() -> None:
    assert augmentation_for(7, 3, 1) == augmentation_for(7, 3, 1)
    variants = {augmentation_for(7, 3, 1), augmentation_for(8, 3, 1), augmentation_for(7, 4, 1), augmentation_for(7, 3, 2)}
    assert len(variants) == 4


def test_background_kept_about_nine_times_in_ten() -> None:
    kept = sum(augmentation_for(0, 0, i).colors[0] == 0 for i in range(1000))
    # 90% keep 0 outright; a full shuffle also keeps it 10% of the time -> ~0.91
    assert 870 <= kept <= 950


def test_known_transform() -> None:
    aug = Augmentation(flip=True, rotations=1, colors=(0, 2, 1, 3, 4, 5, 6, 7, 8, 9))
    # recolour 1<->2: [[0,2,1],[3,4,5]]; flip lr: [[1,2,0],[5,4,3]]; rot90 ccw: [[0,3],[2,4],[1,5]]
    assert aug.apply(GRID) == [[0, 3], [2, 4], [1, 5]]
    assert Augmentation().is_identity and Augmentation().apply(GRID) == GRID


def test_apply_task_transforms_every_grid_consistently() -> None:
    task = {"train": [{"input": GRID, "output": [[5]]}], "test": [{"input": [[1, 2]], "output": [[2, 1]]}]}
    aug = augmentation_for(0, 0, 5)
    out = aug.apply_task(task)
    assert out["train"][0] == {"input": aug.apply(GRID), "output": aug.apply([[5]])}
    assert out["test"][0]["output"] == aug.apply([[2, 1]])
    assert task["train"][0]["input"] == GRID  # the source task is untouched


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="permutation"):
        Augmentation(colors=(0,) * 10)
    with pytest.raises(ValueError, match="rotations"):
        Augmentation(rotations=4)
