"""ARC rewards: compare a program's outputs with the expected grids, then turn that into a number.

:func:`evaluate` reduces a sandbox :class:`~fp16rl.sandbox.ExecutionResult` to an
:class:`Evaluation` (outcome, per-grid correctness and pixel scores per partition). A reward
function maps one ``Evaluation`` to a float:

* ``arc-v2-no-pixel-score``: 0 on any failure, else ``1 + 9c``, in [1, 10].
* ``arc-v1``: 0 on any failure, else ``1 + 8c + p``, in [1, 10].

with ``c = (n_train*train_correct + n_test*test_correct) / (n_train + n_test)`` (fractions of
grids exactly right) and ``p`` the same weighting of mean pixel scores. A failure is any outcome
other than ``ok`` (parse error, exception, timeout, memory limit, invalid output). A program judged
to copy shown train outputs (:mod:`fp16rl.tasks.arc.copying`) reaches the formulas with no train
grid right and every pixel score 0, so it earns no more than a valid program with every grid wrong.

Custom rewards are named ``"package.module:function"`` where ``function(evaluation: Evaluation)
-> float``; the module must be importable (on ``sys.path``).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fp16rl.sandbox import ExecutionResult, Outcome
from fp16rl.tasks.arc.data import Grid

@dataclass(frozen=True)
class Evaluation:
    """One completion's run judged against the expected grids (train pairs first, then test)."""

    outcome: Outcome
    error: str | None
    train_correct: list[bool]
    test_correct: list[bool]
    train_pixel: list[float]
    test_pixel: list[float]
    copied_train: list[int] = field(default_factory=list)  # train pairs judged copied (copying.py)
    copy_evidence: str | None = None

    @property
    def copying(self) -> bool:
        """Judged to copy shown train outputs: then paid as a valid program with every grid wrong."""
        return bool(self.copied_train)

    @property
    def ok(self) -> bool:
        """The program ran and returned a valid grid for every input."""
        return self.outcome == Outcome.OK

    @property
    def correct_score(self) -> float:
        """c: partition-size-weighted fraction of grids exactly right."""
        return _weighted(self.train_correct, self.test_correct)

    @property
    def pixel_score(self) -> float:
        """p: partition-size-weighted mean pixel score."""
        return _weighted(self.train_pixel, self.test_pixel)

    @property
    def solved(self) -> bool:
        """Every train and test grid exactly right (the maximum of both built-in rewards)."""
        return self.ok and all(self.train_correct) and all(self.test_correct)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for sample logs and the CLI."""
        return {
            **asdict(self),
            "outcome": self.outcome.value,
            "train_correct_ratio": _mean(self.train_correct),
            "test_correct_ratio": _mean(self.test_correct),
            "correct_score": self.correct_score,
            "pixel_score": self.pixel_score,
            "solved": self.solved,
            "copying": self.copying,
        }


RewardFn = Callable[[Evaluation], float]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def _weighted(train: Sequence[float], test: Sequence[float]) -> float:
    n_train, n_test = len(train), len(test)
    if n_train + n_test == 0:
        return 0.0
    return (n_train * _mean(train) + n_test * _mean(test)) / (n_train + n_test)


def pixel_score(pred: Grid | None, target: Grid) -> float:
    """Same shape: fraction of equal cells. Different shape: the most equal cells over every
    offset at which the grids overlap, divided by (max height * max width). None scores 0."""
    if pred is None:
        return 0.0
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape == t.shape:
        return float((p == t).mean())
    (hp, wp), (ht, wt) = p.shape, t.shape
    # Pad the target with a non-colour so every placement of pred is one window of the padded grid.
    padded = np.pad(t, ((hp - 1, hp - 1), (wp - 1, wp - 1)), constant_values=-1)
    matches = (sliding_window_view(padded, (hp, wp)) == p).sum(axis=(2, 3))
    return float(matches.max()) / (max(hp, ht) * max(wp, wt))


def evaluate(
    result: ExecutionResult, train_targets: Sequence[Grid], test_targets: Sequence[Grid]
) -> Evaluation:
    """Judge outputs (one per train input, then one per test input) against the targets."""
    n_train = len(train_targets)
    targets = [*train_targets, *test_targets]
    if result.outcome == Outcome.OK:
        correct = [out == target for out, target in zip(result.outputs, targets)]
        pixels = [pixel_score(out, target) for out, target in zip(result.outputs, targets)]
    else:
        correct, pixels = [False] * len(targets), [0.0] * len(targets)
    return Evaluation(
        outcome=Outcome(result.outcome),
        error=result.error,
        train_correct=correct[:n_train],
        test_correct=correct[n_train:],
        train_pixel=pixels[:n_train],
        test_pixel=pixels[n_train:],
    )


def arc_v1(evaluation: Evaluation) -> float:
    """0 on failure, else 1 + 8c + p."""
    if not evaluation.ok:
        return 0.0
    return 1.0 + 8.0 * evaluation.correct_score + evaluation.pixel_score


def arc_v2_no_pixel_score(evaluation: Evaluation) -> float:
    """0 on failure, else 1 + 9c: no credit for near misses, so only exact grids pay."""
    if not evaluation.ok:
        return 0.0
    return 1.0 + 9.0 * evaluation.correct_score


REWARDS: dict[str, RewardFn] = {"arc-v1": arc_v1, "arc-v2-no-pixel-score": arc_v2_no_pixel_score}
DEFAULT_REWARD = "arc-v2-no-pixel-score"  # the seed experiment's reward


def get_reward(name: str) -> RewardFn:
    """A built-in reward by name, or a custom one given as ``"module:function"``."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown reward {name!r}; choose {', '.join(REWARDS)} or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r}: {exc}") from exc
    except AttributeError:
        raise ValueError(f"reward {name!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {attr!r} is not callable")
    return fn


def step_metrics(evaluations: Sequence[Evaluation]) -> dict[str, float]:
    """Per-step metrics: solved ratio, share judged to copy shown outputs, and one ratio per code
    outcome (the loop adds completion/*)."""
    total = max(len(evaluations), 1)
    metrics = {"reward/solved_ratio": sum(e.solved for e in evaluations) / total,
               "arc/copy_fraction": sum(e.copying for e in evaluations) / total}
    for outcome in Outcome:
        metrics[f"code/{outcome.value}_ratio"] = sum(e.outcome == outcome for e in evaluations) / total
    return metrics
