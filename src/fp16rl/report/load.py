"""The report's inputs: run folders and compare folders, read into ``Run`` objects (nothing is written)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from fp16rl.config.dtypes import canonical_dtype
from fp16rl.core.errors import PrecisionError, ReportError
from fp16rl.runs.folders import arm_slug
from fp16rl.runs.folders import DONE_STATUSES  # a run whose outcome is known
from fp16rl.runs.tracking import read_metrics


@dataclass
class Run:
    """One training run as the report sees it: where it is, its arm and seed, its step records."""

    path: Path
    arm: str
    seed: int | None
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def status(self) -> str:
        """summary.json's status; "unfinished" when the run has not written one yet."""
        return str(self.summary.get("status")) if self.summary else "unfinished"

    @property
    def complete(self) -> bool:
        """Only runs whose outcome is known enter the paired comparison and the collapse counts."""
        return self.status in DONE_STATUSES

    @property
    def collapse_step(self) -> int | None:
        step = self.summary.get("collapse_step") if self.summary else None
        return int(step) if step is not None else None

    def values(self, metric: str) -> np.ndarray:
        """The metric at every logged step, NaN where missing or non-finite (null in metrics.jsonl, or the
        "nan"/"inf" strings of older files)."""
        return np.array([as_float(r.get(metric)) for r in self.records], dtype=float)

    @property
    def budget_note(self) -> str | None:
        """The report's line for a run over its ``--mismatch-budget`` (``mismatch/budget_exceeded`` 1 at some
        step, ``training/budget.py``): stopped there, or warned and went on; None for the others."""
        over = [int(r["step"]) for r in self.records if as_float(r.get("mismatch/budget_exceeded")) == 1.0]
        if not over:
            return None
        seed = f", seed {self.seed}" if self.seed is not None else ""
        if self.status == "stopped_on_mismatch_budget":
            return f"{self.arm}{seed}: stopped at step {over[-1]}, its precision mismatch over --mismatch-budget"
        steps = ", ".join(map(str, over[:5])) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        return f"{self.arm}{seed}: precision mismatch over --mismatch-budget at step {steps} (warned, went on)"

    @property
    def steps(self) -> np.ndarray:
        return np.array([int(r["step"]) for r in self.records], dtype=int)

    def has(self, metric: str) -> bool:
        return bool(np.isfinite(self.values(metric)).any())

    @property
    def skipped_steps(self) -> int | None:
        """Optimizer steps skipped (fp16 overflow, a non-finite gradient) up to the last logged step: the
        last ``optim/skipped_steps_total``, else the sum of ``optim/step_skipped``; None when neither is logged."""
        for metric, last_or_sum in (("optim/skipped_steps_total", lambda v: v[-1]), ("optim/step_skipped", np.sum)):
            values = self.values(metric)
            if np.isfinite(values).any():
                return int(last_or_sum(values[np.isfinite(values)]))
        return None


@dataclass
class Inputs:
    """Everything loaded from the paths: runs, arms in display order, expected runs per arm, notes."""

    runs: list[Run] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def as_float(value: Any) -> float:
    """A finite float, or NaN for missing, non-numeric and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def arm_label(config: dict[str, Any]) -> str:
    """A label for a run that has no arm name: its dtype, plus the ablation settings that differ."""
    def canon(value: Any) -> str:
        try:
            return canonical_dtype(value)
        except PrecisionError:
            return str(value)

    parts = [f"dtype={canon(config.get('dtype', '?'))}"]
    for key in ("sampler_dtype", "trainer_dtype"):
        if config.get(key):
            parts.append(f"{key}={canon(config[key])}")
    if config.get("is_correction") not in (None, "none"):
        parts.append(f"is_correction={config['is_correction']}")
    return ",".join(parts)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err})") from None


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ReportError(f"{path} is not valid YAML ({' '.join(str(err).split())})") from None
    return document.get("config", {}) if isinstance(document, dict) else {}


def load_run(run_dir: Path, arm: str | None = None, seed: int | None = None) -> Run:
    """A run folder; ``arm``/``seed`` (from compare.json) win over what the run itself says."""
    summary = _read_json(run_dir / "summary.json")
    config = _read_config(run_dir)
    if arm is None:
        arm = (summary or {}).get("arm") or config.get("arm") or (arm_label(config) if config else run_dir.name)
    if seed is None:
        raw = config.get("seed", (summary or {}).get("seed"))
        seed = int(raw) if raw is not None else None
    return Run(run_dir, str(arm), seed, read_metrics(run_dir / "metrics.jsonl"), summary)


def load_compare(compare_dir: Path) -> Inputs:
    """The runs of a compare folder, arm by arm and seed by seed; missing ones become notes."""
    spec = _read_json(compare_dir / "compare.json") or {}
    arms = [a["name"] for a in spec.get("arms", [])]
    seeds = [int(s) for s in spec.get("seeds", [])]
    if not arms or not seeds:
        raise ReportError(f"{compare_dir / 'compare.json'} lists no arms or no seeds")
    inputs = Inputs(arms=list(arms), expected={arm: len(seeds) for arm in arms})
    for arm in arms:
        for seed in seeds:
            run_dir = compare_dir / "runs" / arm_slug(arm) / f"seed-{seed}"
            run = load_run(run_dir, arm=arm, seed=seed) if run_dir.is_dir() else None
            if run is None or not run.records:
                inputs.notes.append(f"{arm}, seed {seed}: {'no metrics yet' if run else 'no run folder'} "
                                    f"({run_dir}); left out")
                continue
            inputs.runs.append(run)
    if not inputs.runs:
        raise ReportError(f"{compare_dir} holds no metrics: none of its {len(arms) * len(seeds)} runs has logged a step")
    return inputs


def load_inputs(paths: Sequence[str | Path]) -> Inputs:
    """Runs from every path, in order; the arms appear in the order first seen."""
    if not paths:
        raise ReportError("no paths given: pass run folders or compare folders")
    inputs = Inputs()
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ReportError(f"{path} does not exist or is not a folder")
        if (path / "compare.json").is_file():
            part = load_compare(path)
        elif (path / "metrics.jsonl").is_file():
            run = load_run(path)
            if not run.records:
                raise ReportError(f"{path} holds no metrics (metrics.jsonl has no step records)")
            part = Inputs(runs=[run], arms=[run.arm], expected={run.arm: 1})
        else:
            raise ReportError(f"{path} is neither a run folder (metrics.jsonl) nor a compare folder (compare.json)")
        _merge(inputs, part)
    _check_unique(inputs.runs)
    return inputs


def _merge(into: Inputs, part: Inputs) -> None:
    for arm in part.arms:
        if arm not in into.arms:
            into.arms.append(arm)
        into.expected[arm] = into.expected.get(arm, 0) + part.expected.get(arm, 0)
    into.runs += part.runs
    into.notes += part.notes


def _check_unique(runs: Iterable[Run]) -> None:
    """Two runs for one (arm, seed) would make the pairing ambiguous."""
    seen: dict[tuple[str, int | None], Path] = {}
    for run in runs:
        key = (run.arm, run.seed)
        if key in seen and run.seed is not None:
            raise ReportError(f"two runs for arm {run.arm!r} seed {run.seed}: {seen[key]} and {run.path}; pass one")
        seen[key] = run.path
