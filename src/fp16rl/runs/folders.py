"""Run folders as files: a folder in use is refused, a run's config.yaml and metrics.jsonl are read back,
summary.json is computed, and an arm gets its folder name. Torch-free; ``fp16rl.training.plan`` builds the
preflight of a new or resumed run on these."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fp16rl.config.parse import load_yaml_mapping
from fp16rl.core.errors import ConfigError, FolderInUseError

DONE_STATUSES = ("finished", "stopped_on_collapse")  # a run in one of these needs no resume
BUDGET_STOPPED = "stopped_on_mismatch_budget"  # stopped by --mismatch-budget (training/budget.py)
# Runs that running again would not change: a budget-stopped run would stop again at the same step.
FINAL_STATUSES = DONE_STATUSES + (BUDGET_STOPPED,)


def refuse_used_folder(path: Path, what: str, hint: str = "choose another folder") -> None:
    """Raise ``FolderInUseError`` if ``path`` is a file or a folder holding anything: every command that
    writes a folder of results refuses one in use, so earlier results are never overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderInUseError(f"{what} {path} exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise FolderInUseError(f"{what} {path} is in use (not empty); {hint}")


def recorded_threads(run_dir: Path) -> int | None:
    """The CPU thread count a run recorded in its config.yaml (``cpu_threads``; None on a GPU or unrecorded)."""
    threads = load_yaml_mapping(run_dir / "config.yaml", "run config").get("cpu_threads")
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else None


def resume_history(run_dir: Path, options: dict[str, Any], step: int) -> list[dict[str, Any]]:
    """config.yaml's ``resumes``: the earlier entries, plus this resume's step and every option it changed
    (``{name: [before, now]}``), so a resumed run's config.yaml shows what it ran with before."""
    previous = load_yaml_mapping(run_dir / "config.yaml", "run config")
    before = previous.get("config") or {}
    changed = {name: [before[name], value] for name, value in options.items()
               if name in before and before[name] != value and name != "resume"}
    return [*(previous.get("resumes") or []), {"at_step": step, "changed": changed}]


def check_metrics_file(path: Path, upto_step: int) -> None:
    """Refuse a metrics.jsonl that is not ours to extend: undecodable, or a bad line before the end.

    Only the last line may be torn (a write that a crash cut short); every step up to the
    checkpoint's must be there, since a resumed run keeps them.
    """
    if not path.exists():
        if upto_step > 0:
            raise ConfigError(f"--resume: {path} is missing; the run's history up to step {upto_step} is gone")
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is corrupt: not UTF-8 text (byte {err.start})") from None
    lines = text.split("\n")  # the last element is "" or the torn line, which resume drops anyway
    steps = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
            steps.append(int(record["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{path} is corrupt: line {number} is not a step record") from None
    missing = sorted(set(range(1, upto_step + 1)) - set(steps))
    if missing:
        raise ConfigError(f"{path} is corrupt: steps {missing[:3]} up to the checkpoint's step {upto_step} are missing")


def summarize_run(records: list[dict[str, Any]], event: Any, *, status: str, total_steps: int,
                  arm: str | None, seed: int, mismatch_includes_rope_scaling: bool = False) -> dict[str, Any]:
    """summary.json: final reward (mean over the last 10% of steps), best reward (best mean over as many
    consecutive steps, so never below the final), collapse, speed; what ``fp16rl compare`` and ``report``
    read. ``mismatch_includes_rope_scaling``: the model's RoPE frequencies follow the sequence length, so
    the sampler/trainer mismatch is not only precision (``prompt_forward.length_dependent_rope``)."""
    import numpy as np

    from fp16rl.runs.tracking import best_reward, final_reward

    rewards = np.array([float(r["reward/mean"]) for r in records if "reward/mean" in r])
    wall = sum(float(r.get("time/step_s", 0.0)) for r in records)
    return {
        "status": status,
        "steps_completed": records[-1]["step"] if records else 0,
        "total_steps": total_steps,
        "final_reward": final_reward(rewards),
        "best_reward": best_reward(rewards),
        "collapse_step": event.step if event else None,
        "collapse_rule": event.rule if event else None,
        "collapse_detail": event.detail if event else None,
        "steps_per_s": len(records) / wall if wall > 0 else None,
        "wall_s": wall,
        "arm": arm,
        "seed": seed,
        "mismatch_includes_rope_scaling": mismatch_includes_rope_scaling,
    }


def arm_slug(name: str) -> str:
    """A folder name for an arm: characters outside ``[A-Za-z0-9._=-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name)
