"""Every seed of a run is derived from ``--seed`` by hashing, so each random stream is a pure function
of what it is for (a step, a prompt slot, a sample) and arms with the same seed are paired."""

from __future__ import annotations


import numpy as np


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of ``keys`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: the same in every arm of a comparison (paired randomness)."""
    return derived_seed(seed, step)


