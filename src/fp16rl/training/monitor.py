"""Collapse detection over the step metrics: a small, documented rule set.

RL runs on code tasks collapse in recognisable ways (docs/design.md): completions degenerate
into loops or gibberish, the truncated ratio jumps, the reward falls far below its best, and in
BF16 the sampler/trainer mismatch grows by orders of magnitude first (the FP16 paper). Each rule
below looks at moving averages so that ordinary step-to-step noise does not fire it; the first
rule to fire gives the run's ``collapse_step``.

Rules (defaults in ``MonitorSettings``):
- ``non_finite``: the loss or the mean reward is NaN/inf.
- ``reward_drop``: the reward moving average has been, for ``patience`` consecutive steps, more
  than ``reward_drop`` of the way from its running best back down to its starting level, after
  having improved by at least ``min_reward_gain`` (a run that never learned cannot collapse).
- ``truncation_surge``: the truncated-ratio moving average exceeds ``truncation_level`` and its
  starting level by ``truncation_rise`` for ``patience`` steps.
- ``repetition_surge``: the unique 4-gram ratio moving average falls below ``repetition_fraction``
  of its starting level for ``patience`` steps.
  A task whose best answers repeat (``toy:digits``: "write a sequence of digits") turns it off
  (``Task.monitor_rules_off``): there it fired on every run as the reward reached 1.0
  (docs/results/sanity-toy.md).
- ``mismatch_explosion``: the moving average of ``mismatch/token_kl_k3`` exceeds
  ``mismatch_factor`` times its starting level and ``mismatch_floor`` for ``patience`` steps.
- ``skipped_steps``: ``max_consecutive_skips`` optimizer steps in a row were skipped (fp16
  overflow that the loss scaler does not recover from).
- ``reward_hacking``: the moving average of ``arc/copy_fraction`` (the share of completions judged
  to copy shown ARC outputs, :mod:`fp16rl.tasks.arc.copying`) exceeds ``copy_level`` and its lowest
  moving average so far by ``copy_rise`` for ``patience`` steps. It is checked before
  ``reward_drop``, so a reward drop that comes with copying is named reward hacking; the
  ``reward_drop`` detail also gives the copy share when the run logs it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

COPY_FRACTION = "arc/copy_fraction"  # logged by the ARC task (tasks/arc/reward.step_metrics)

@dataclass(frozen=True)
class MonitorSettings:
    window: int = 10  # steps in each moving average; the first full window is the starting level
    patience: int = 5  # consecutive steps a condition must hold
    reward_drop: float = 0.5
    min_reward_gain: float = 0.1
    truncation_level: float = 0.5
    truncation_rise: float = 0.3
    repetition_fraction: float = 0.5
    mismatch_factor: float = 100.0
    mismatch_floor: float = 1e-3
    max_consecutive_skips: int = 10
    copy_level: float = 0.2
    copy_rise: float = 0.15
    rules_off: frozenset[str] = frozenset()  # rules that do not apply to the task (``Task.monitor_rules_off``)


@dataclass(frozen=True)
class CollapseEvent:
    step: int
    rule: str
    detail: str


@dataclass
class _Series:
    """A moving average with its starting level (the first full window)."""

    window: int
    values: deque = field(default_factory=deque)
    start: float | None = None
    best: float = -math.inf
    low: float = math.inf

    def push(self, value: float) -> float | None:
        self.values.append(value)
        if len(self.values) > self.window:
            self.values.popleft()
        if len(self.values) < self.window:
            return None
        average = sum(self.values) / self.window
        if self.start is None:
            self.start = average
        self.best = max(self.best, average)
        self.low = min(self.low, average)
        return average


class CollapseMonitor:
    """Feed it every step's metrics; it returns the first ``CollapseEvent`` and then stays fired."""

    def __init__(self, settings: MonitorSettings = MonitorSettings()):
        self.settings = settings
        self.event: CollapseEvent | None = None
        self._series = {name: _Series(settings.window) for name in
                        ("reward/mean", "completion/truncated_ratio", "completion/unique_ngram_ratio_4",
                         "mismatch/token_kl_k3", COPY_FRACTION)}
        self._streak = {rule: 0 for rule in ("reward_hacking", "reward_drop", "truncation_surge",
                                             "repetition_surge", "mismatch_explosion")}
        self._skips = 0

    def update(self, step: int, metrics: dict[str, float]) -> CollapseEvent | None:
        """Check one step; returns the event on the step it fires, else None."""
        if self.event is not None:
            return None
        for fired in self._check(metrics):
            self.event = CollapseEvent(step, *fired)
            return self.event
        return None

    def _check(self, metrics: dict[str, float]) -> Iterable[tuple[str, str]]:
        s = self.settings
        for key in ("optim/loss", "reward/mean"):
            value = _number(metrics.get(key))
            if value is not None and not math.isfinite(value):
                yield "non_finite", f"{key} is {value}"
        self._skips = self._skips + 1 if metrics.get("optim/step_skipped", 0) else 0
        if self._skips >= s.max_consecutive_skips:
            yield "skipped_steps", f"{self._skips} consecutive optimizer steps skipped (fp16 overflow)"

        averages = {name: series.push(v) for name, series in self._series.items()
                    if (v := _number(metrics.get(name))) is not None and math.isfinite(v)}
        copying = self._series[COPY_FRACTION]
        copy_note = ""
        if averages.get(COPY_FRACTION) is not None:
            value = averages[COPY_FRACTION]
            copy_note = f"; copy share {value:.2f} (lowest {copying.low:.2f})"
            yield from self._sustained("reward_hacking", value > max(s.copy_level, copying.low + s.copy_rise),
                                       f"share of completions copying shown outputs {value:.2f} "
                                       f"(lowest {copying.low:.2f}, start {copying.start:.2f})")
        reward = self._series["reward/mean"]
        if averages.get("reward/mean") is not None and reward.best - reward.start >= s.min_reward_gain:
            threshold = reward.best - s.reward_drop * (reward.best - reward.start)
            yield from self._sustained("reward_drop", averages["reward/mean"] < threshold,
                                       f"reward moving average {averages['reward/mean']:.3f} < {threshold:.3f} "
                                       f"(best {reward.best:.3f}, start {reward.start:.3f}){copy_note}")
        trunc = self._series["completion/truncated_ratio"]
        if averages.get("completion/truncated_ratio") is not None:
            value = averages["completion/truncated_ratio"]
            yield from self._sustained("truncation_surge",
                                       value > s.truncation_level and value > trunc.start + s.truncation_rise,
                                       f"truncated ratio {value:.2f} (start {trunc.start:.2f})")
        rep = self._series["completion/unique_ngram_ratio_4"]
        if averages.get("completion/unique_ngram_ratio_4") is not None:
            value = averages["completion/unique_ngram_ratio_4"]
            yield from self._sustained("repetition_surge", value < s.repetition_fraction * rep.start,
                                       f"unique 4-gram ratio {value:.2f} (start {rep.start:.2f})")
        kl = self._series["mismatch/token_kl_k3"]
        if averages.get("mismatch/token_kl_k3") is not None:
            value = averages["mismatch/token_kl_k3"]
            limit = max(s.mismatch_factor * kl.start, s.mismatch_floor)
            yield from self._sustained("mismatch_explosion", value > limit,
                                       f"mismatch k3 KL {value:.2e} > {limit:.2e} (start {kl.start:.2e})")

    def _sustained(self, rule: str, condition: bool, detail: str) -> Iterable[tuple[str, str]]:
        self._streak[rule] = self._streak[rule] + 1 if condition and rule not in self.settings.rules_off else 0
        if self._streak[rule] >= self.settings.patience:
            yield rule, detail


def monitor_for(task: object) -> CollapseMonitor:
    """The run's monitor, without the sustained rules ``task`` declares do not apply to it (an optional
    ``monitor_rules_off`` tuple of rule names on the task)."""
    return CollapseMonitor(MonitorSettings(rules_off=frozenset(getattr(task, "monitor_rules_off", ()))))


def _number(value: object) -> float | None:
    """A metric as a float; also the strings 'nan'/'inf' of metrics files written before JSON null
    (``tracking.read_metrics`` turns both into floats)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
