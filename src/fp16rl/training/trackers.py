"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, Trackio, MLflow (``--report-to``).
Every backend gets the same scalars per step; metrics.jsonl (``fp16rl.runs.tracking``) stays the source of truth.
At the steps samples/ records, every backend also gets the completions table (``completions.py``) in its
own form: TensorBoard a Markdown table (text panel), W&B and trackio a ``Table``, MLflow a JSON table artifact."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from fp16rl.core.atomic import atomic_write_text
from fp16rl.core.errors import ConfigError
from fp16rl.runs.tracking import jsonable, read_metrics
from fp16rl.training.completions import completions_table, markdown_table


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
        """A logged step's completion records (``completions.py``): samples/step-NNNNNN.jsonl, and their
        table to every backend."""
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(self.samples_dir / f"step-{step:06d}.jsonl", text)
        columns, data = completions_table(step, samples)
        for backend in self.backends:
            backend.log_table(step, columns, data)

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

    def log_table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        """TensorBoard has no table type: the table as Markdown, under the tag ``completions`` (TEXT tab)."""
        self.writer.add_text("completions", markdown_table(columns, data), step)

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

    def log_table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        """A ``wandb.Table`` named ``completions``; mixed types allowed, as a ``log_extra`` column may mix
        them (W&B's default refuses a column of numbers and text)."""
        import wandb

        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        self.run.log({"completions": table}, step=step)

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

    def log_table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        self.trackio.log({"completions": self.trackio.Table(columns=columns, data=data)}, step=step)

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

    def log_table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        """MLflow tables are JSON artifacts: ``completions/step-NNNNNN.json``, one per logged step (its
        evaluation UI lists them; ``mlflow.load_table`` reads one back)."""
        self.mlflow.log_table({column: [row[i] for row in data] for i, column in enumerate(columns)},
                              artifact_file=f"completions/step-{step:06d}.json")

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
