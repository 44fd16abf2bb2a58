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
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Progress_

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


def jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: written as strings (in nested dicts and lists too) so files parse everywhere."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def library_versions() -> dict[str, str]:
    """Versions of what computed the numbers, recorded with every run and probe."""
    import platform
    import sys

    import peft
    import torch
    import transformers

    import fp16rl

    versions = {"fp16rl": fp16rl.__version__, "torch": str(torch.__version__), "transformers": transformers.__version__,
                "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "torch_threads": str(torch.get_num_threads())}
    if "bitsandbytes" in sys.modules:
        versions["bitsandbytes"] = sys.modules["bitsandbytes"].__version__
    return versions


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
        record = {"step": step, **jsonable(metrics)}
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
        stats = (
            f"reward {metrics.get('reward/mean', float('nan')):.3f}  "
            f"|dlogp| {metrics.get('mismatch/logp_abs_diff_mean', float('nan')):.2e}  "
            f"kl {metrics.get('mismatch/token_kl_k3', float('nan')):.1e}  "
            f"scale {metrics.get('optim/loss_scale', 1.0):.0f}"
        )
        self.update(completed=step, description=stats)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
