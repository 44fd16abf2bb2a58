"""Where a run's numbers go: metrics.jsonl (the source of truth), TensorBoard, samples/, a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fp16rl.atomic import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All step records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


BEST_WINDOW = 10  # best reward = best moving average over this many steps


def final_reward(rewards: np.ndarray) -> float | None:
    """Mean reward over the last 10% of the logged steps (at least one); non-finite values ignored."""
    finite = rewards[np.isfinite(rewards)]
    if finite.size == 0:
        return None
    tail = max(1, finite.size // 10)
    return float(finite[-tail:].mean())


def best_reward(rewards: np.ndarray, window: int = BEST_WINDOW) -> float | None:
    """Best moving average over ``window`` steps (all steps when fewer); non-finite values ignored."""
    finite = rewards[np.isfinite(rewards)]
    if finite.size == 0:
        return None
    width = min(window, finite.size)
    sums = np.convolve(finite, np.ones(width), mode="valid")
    return float(sums.max() / width)


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so the file stays parseable everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunTracker:
    """Appends one JSON object per step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_dir = self.run_dir / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            # Steps after the checkpoint will be run again: drop their records so no step appears twice.
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= resume_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = self.metrics_path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())  # the source of truth survives a crash with the checkpoint it matches
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(self.samples_dir / f"step-{step:06d}.jsonl", text)

    def close(self) -> None:
        self._metrics.close()
        self.tb.close()


class ProgressDisplay:
    """One progress line with the numbers a user watches: reward, mismatch, loss scale.

    On a terminal it is a live bar; otherwise (output sent to a log file, a batch system) it prints one
    plain line per step, so a log shows progress instead of nothing until the run ends.
    """

    def __init__(self, total_steps: int, start_step: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.total_steps, self.start_step = total_steps, start_step
        self.live = self.console.is_terminal
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        stats = (
            f"reward {metrics.get('reward/mean', float('nan')):.3f}  "
            f"|dlogp| {metrics.get('mismatch/logp_abs_diff_mean', float('nan')):.2e}  "
            f"kl {metrics.get('mismatch/token_kl_k3', float('nan')):.1e}  "
            f"scale {metrics.get('optim/loss_scale', 1.0):.0f}"
        )
        if self.live:
            self.progress.update(self.task, completed=step, stats=stats)
            return
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / max(step - self.start_step, 1)
        remaining = per_step * (self.total_steps - step)
        print(f"step {step}/{self.total_steps}  {stats}  {metrics.get('time/step_s', per_step):.1f} s/step  "
              f"elapsed {_clock(elapsed)}  remaining ~{_clock(remaining)}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
