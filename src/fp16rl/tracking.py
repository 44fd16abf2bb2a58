"""Where a run's numbers go: metrics.jsonl (the source of truth), TensorBoard, samples/, a progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Progress_

from fp16rl.atomic import atomic_write_text
from fp16rl.errors import ConfigError


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
    """Appends one JSON object per step (the source of truth) and mirrors the scalars to the
    ``--report-to`` backends under the same names."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, report_to: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_dir = self.run_dir / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            # Steps after the checkpoint will be run again: drop their records so no step appears twice.
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= resume_step]
            text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in kept)  # old files: null now
            atomic_write_text(self.metrics_path, text)
        self._metrics = self.metrics_path.open("a")
        self.backends = []
        for name in report_to:
            if name == "none":
                continue
            try:
                self.backends.append(BACKENDS[name](self.run_dir, resume_step, config or {}))
            except Exception as err:  # a tracker that cannot start is a setup problem: say which and why
                raise ConfigError(f"--report-to {name} could not start: {type(err).__name__}: {err}") from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **jsonable(metrics)}
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())  # the source of truth survives a crash with the checkpoint it matches
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for backend in self.backends:
            backend.log(step, scalars)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(self.samples_dir / f"step-{step:06d}.jsonl", text)

    def close(self) -> None:
        self._metrics.close()
        for backend in self.backends:
            backend.close()


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def hint(run_dir: Path) -> str:
        return f"tensorboard --logdir {run_dir / 'tb'}"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """Weights & Biases, offline unless ``WANDB_MODE`` says otherwise (files under <run>/wandb)."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fp16rl"), name=run_dir.name,
                              dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new")

    @staticmethod
    def hint(run_dir: Path) -> str:
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode in ("offline", "dryrun"):
            return f"{run_dir / 'wandb'} (offline; upload with wandb sync {run_dir / 'wandb'}/offline-run-*)"
        if mode == "disabled":
            return "nothing written (WANDB_MODE=disabled)"
        return f"project {os.environ.get('WANDB_PROJECT', 'fp16rl')}, run {run_dir.name}"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """trackio, local-first: its database under <run>/trackio unless ``TRACKIO_DIR`` is set."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict[str, Any]):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))
        import trackio
        from trackio import utils

        if Path(utils.TRACKIO_DIR) != Path(os.environ["TRACKIO_DIR"]):  # read once, when trackio was imported
            logging.getLogger("fp16rl").warning(
                f"trackio was imported before this run (by TRL, say), so its database is in {utils.TRACKIO_DIR}, "
                f"not {os.environ['TRACKIO_DIR']}; set TRACKIO_DIR before starting Python to choose")
        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fp16rl"), name=run_dir.name,
                                config=config, resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)

    @staticmethod
    def hint(run_dir: Path) -> str:
        folder = os.environ.get("TRACKIO_DIR", str(run_dir / "trackio"))
        return f"TRACKIO_DIR={folder} trackio show --project {os.environ.get('TRACKIO_PROJECT', 'fp16rl')}"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Mlflow:
    """MLflow, to a local file store under <run>/mlruns unless ``MLFLOW_TRACKING_URI`` is set (a server,
    or sqlite:///... with the full mlflow package)."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the store that needs no database package
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fp16rl"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    @staticmethod
    def hint(run_dir: Path) -> str:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith(("http://", "https://", "databricks")):  # a tracking server: it shows the run itself
            return f"{uri}, experiment {os.environ.get('MLFLOW_EXPERIMENT_NAME', 'fp16rl')}, run {run_dir.name}"
        return f"mlflow ui --backend-store-uri {uri}"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _Mlflow}


def output_lines(run_dir: Path, report_to: Sequence[str]) -> list[str]:
    """Where a finished run's outputs are, one console line each: a tracker's line only when
    ``--report-to`` named it (with the command that shows it)."""
    places = [("metrics", str(run_dir / "metrics.jsonl")),
              *[(name, BACKENDS[name].hint(run_dir)) for name in report_to if name in BACKENDS],
              ("samples", str(run_dir / "samples")), ("checkpoints", str(run_dir / "checkpoints"))]
    return [f"{label + ':':<14}{place}" for label, place in places]


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
