"""A run's numbers read back (metrics.jsonl, the source of truth; final and best reward) and the progress bar.
Writing them, samples/ and the --report-to backends is ``fp16rl.training.trackers``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Progress_



# Files written before JSON null became the convention held non-finite values as these strings.
_OLD_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All step records of a metrics.jsonl file (a torn last line from a crash is ignored).

    A non-finite value is ``null`` on disk (see ``jsonable``) and ``math.nan`` here, so every reader
    gets a float; the strings "nan"/"inf"/"-inf" of older files are read as the floats they name.
    ``math.nan`` is one object, so records that both hold NaN at the same place still compare equal.
    """
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        records.append({key: _as_number(value) for key, value in record.items()})
    return records


def _as_number(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _OLD_NON_FINITE.get(value, value)
    return value


def reward_window(steps: int) -> int:
    """Steps in the window of ``final_reward`` and ``best_reward``: 10% of the logged steps, at least one."""
    return max(1, steps // 10)


def final_reward(rewards: np.ndarray) -> float | None:
    """Mean reward over the last ``reward_window`` logged steps; non-finite values ignored."""
    finite = rewards[np.isfinite(rewards)]
    if finite.size == 0:
        return None
    return float(finite[-reward_window(finite.size):].mean())


def best_reward(rewards: np.ndarray) -> float | None:
    """Best mean over ``reward_window`` consecutive logged steps; non-finite values ignored.

    The same window as ``final_reward``, whose window is one of those compared, so best >= final
    always (two different windows let a short run's best fall below its final reward). The final
    window's own mean enters the max too: a sliding sum may round differently in the last bit.
    """
    finite = rewards[np.isfinite(rewards)]
    if finite.size == 0:
        return None
    means = np.lib.stride_tricks.sliding_window_view(finite, reward_window(finite.size)).mean(axis=1)
    return float(max(means.max(), final_reward(finite)))


def jsonable(value: Any) -> Any:
    """NaN and +-inf are not JSON: written as ``null`` (in nested dicts and lists too), as pandas'
    ``to_json`` and JavaScript do, so strict ``json.loads``, pandas and ``datasets`` read the files it
    serves (metrics.jsonl, report.json, probe.json, perfectible's output). There a ``null`` number always
    means "not finite"; which of NaN, inf or -inf it was is not kept."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """Progress of long work: a live bar on a terminal; elsewhere (a log file, a batch system) a plain
    line every ``plain_interval_s`` seconds and at the end, so a log shows progress; or nothing."""

    def __init__(self, label: str, total: int, completed: int = 0, enabled: bool = True, unit: str = "step",
                 plain_interval_s: float = 10.0, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.label, self.total, self.unit, self.interval = label, total, unit, plain_interval_s
        self.enabled, self.live = enabled, enabled and self.console.is_terminal
        self.start_count = self.count = completed
        self.started = self.last_print = time.perf_counter()
        self.description = ""
        self.bar = Progress_(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console,
                             transient=False)
        self.task = self.bar.add_task(label, total=total, completed=completed)

    def __enter__(self) -> "Progress":
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()

    def update(self, completed: int | None = None, advance: int = 0, description: str | None = None) -> None:
        self.count = (completed if completed is not None else self.count) + advance
        self.description = description if description is not None else self.description
        if self.live:
            self.bar.update(self.task, completed=self.count, description=self.description)
            return
        now = time.perf_counter()
        moved = completed is not None or advance
        if not self.enabled or not moved or (now - self.last_print < self.interval and self.count < self.total):
            return
        self.last_print = now
        elapsed = now - self.started
        per_item = elapsed / max(self.count - self.start_count, 1)
        print(f"{self.label} {self.count}/{self.total}  {self.description}  {per_item:.1f} s/{self.unit}  "
              f"elapsed {_clock(elapsed)}  remaining ~{_clock(per_item * (self.total - self.count))}",
              file=sys.stderr, flush=True)


class ProgressDisplay(Progress):
    """The training run's progress: the numbers a user watches (reward, mismatch, loss scale) each step."""

    def __init__(self, total_steps: int, start_step: int, console: Console | None = None):
        super().__init__("train", total_steps, start_step, plain_interval_s=0.0, console=console)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.update(completed=step, description=progress_stats(metrics))


def progress_stats(metrics: dict[str, float]) -> str:
    """The progress line's numbers for one step. Optimizer steps skipped so far (fp16 overflow, or a
    non-finite gradient) appear once there is one, since the weights did not move on those steps."""
    stats = (
        f"reward {metrics.get('reward/mean', math.nan):.3f}  "
        f"|dlogp| {metrics.get('mismatch/logp_abs_diff_mean', math.nan):.2e}  "
        f"kl {metrics.get('mismatch/token_kl_k3', math.nan):.1e}  "
        f"scale {metrics.get('optim/loss_scale', 1.0):.0f}"
    )
    skipped = metrics.get("optim/skipped_steps_total", 0.0)
    if skipped > 0:
        stats += f"  skipped {skipped:.0f}" + (" (this step)" if metrics.get("optim/step_skipped", 0.0) else "")
    return stats


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
