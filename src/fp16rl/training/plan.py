"""Run planning: the preflight every entry point shares (CLI, Python API), before torch loads.

``plan_run`` refuses an output path that is a file, a folder in use, a resume whose options or files do
not match the run, a model path that is not a model folder, an unknown dataset, all without importing
torch and without touching the disk. ``RunPlan.create`` makes the folder only once everything else has
been loaded, so a refused run leaves nothing behind. A folder whose run ended before its first step (no
checkpoint, no logged step) is reused, not refused (``fp16rl.runs.reuse``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import resume_conflicts, stored_run_options
from fp16rl.core.errors import ConfigError
from fp16rl.core.paths import TINY, resolve_model_path
from fp16rl.runs.checkpoint import checkpoint_dirs, checkpoint_problem, read_trainer_state
from fp16rl.runs.folders import check_metrics_file, recorded_threads, refuse_used_folder
from fp16rl.runs.reuse import ended_before_step_one, reuse
from fp16rl.tasks.checks import check_dataset, reward_conflict


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



def check_ranks(config: TrainConfig, world_size: int) -> None:
    """Options the ranks of a launch cannot run, refused by every rank alike: the CLI asks before torch
    loads (``launched_ranks``), so no process group is set up for a run that cannot start."""
    if world_size == 1:
        return
    if config.algorithm == "ppo":
        raise ConfigError("--algorithm ppo trains in one process (its critic's gradients are not reduced across "
                          "ranks); launch it without torchrun, or use --algorithm grpo with several ranks")
    if config.max_staleness:
        raise ConfigError(f"--max-staleness {config.max_staleness} runs its sampler process beside one learner; "
                          "launch it without torchrun, or use --max-staleness 0 with several ranks")
    if config.prompts_per_step % world_size:
        raise ConfigError(f"--prompts-per-step {config.prompts_per_step} does not divide among {world_size} ranks; "
                          "each rank owns whole prompt groups (use a multiple of the number of ranks)")
    rows = config.prompts_per_step // world_size * config.num_generations
    if rows % config.gradient_accumulation_steps:
        raise ConfigError(f"each of the {world_size} ranks holds {rows} completions per step, which "
                          f"--gradient-accumulation-steps {config.gradient_accumulation_steps} does not divide")



def check_report_to(report_to: list[str]) -> None:
    """A ``--report-to`` backend whose package is missing is refused before anything is written."""
    import importlib.util

    for name in report_to:
        if name not in ("tensorboard", "none") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'fp16rl[{name}]'")
