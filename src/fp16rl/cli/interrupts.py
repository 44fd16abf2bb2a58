"""What ``fp16rl train`` says when Ctrl-C stops it outside the training loop's safe points.

The training loop handles the first Ctrl-C itself (``fp16rl.training.interrupt``: a checkpoint, then exit 130).
What reaches the CLI as ``KeyboardInterrupt`` is either the second signal (``StoppedAtOnce``) or a
first one that came before the handler was installed: during start-up (parsing, checks, loading).
Each gets a line that is true of the folder as it is: ``--resume`` is advised only where a
checkpoint exists, and a new run stopped during start-up leaves its folder as it found it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape

from fp16rl.runs.checkpoint import checkpoint_dirs
from fp16rl.cli.common import console
from fp16rl.core.errors import INTERRUPTED_EXIT
from fp16rl.core.ranks import is_main_process
from fp16rl.runs.reuse import discard_run_entries, ended_before_step_one, holds_nothing_of_value



def next_move(run_dir: Path) -> str:
    """How to go on from the folder a stopped run left: resume, start again, or neither."""
    checkpoints = checkpoint_dirs(run_dir)
    if checkpoints:
        return f"the latest checkpoint ({checkpoints[-1]}) is kept; continue with --resume"
    if ended_before_step_one(run_dir):
        return "no step was completed; run the same command to start again (the folder is reused)"
    return (f"no checkpoint was saved, so the run cannot be resumed; move {run_dir} away or choose another "
            "--output-dir to start again")


def start_up_message(config: Any, plan: Any) -> str:
    """A first Ctrl-C before the run's trainer existed. A new run's folder is emptied of what it wrote
    (only fp16rl's own entries, only when it holds no logged step: ``run_reuse``)."""
    if config is None or plan is None:  # still parsing or checking: nothing written yet
        return "interrupted during start-up: nothing was written" + (
            f"; {config.output_dir} is unchanged" if config is not None and config.resume else "")
    if plan.resume_from is not None:
        return f"interrupted during start-up: {plan.run_dir} is unchanged; continue with --resume"
    if holds_nothing_of_value(plan.run_dir):
        discard_run_entries(plan.run_dir)
    return "interrupted during start-up, before step 1: nothing was trained or kept; run the same command to start"


def stop_interrupted(config: Any, plan: Any, trainer: Any, at_once: bool) -> NoReturn:
    """Print (rank 0) what a ``KeyboardInterrupt`` left behind and exit 130. ``trainer`` is None during
    start-up; ``at_once``: the second signal (``fp16rl.training.interrupt.StoppedAtOnce``)."""
    if trainer is None:
        message = start_up_message(config, plan)
    else:
        message = ("stopped at once (second signal): " if at_once else "interrupted: ") + next_move(trainer.run_dir)
    if is_main_process():
        console.print(escape(message), highlight=False, soft_wrap=True)
    raise typer.Exit(INTERRUPTED_EXIT)
