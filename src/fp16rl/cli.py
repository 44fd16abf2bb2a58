"""The ``fp16rl`` command: train | models | arc | demo (probe, compare and report come next)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fp16rl.config import ConfigError, parse_train_args
from fp16rl.models import ModelError, TinyModelSpec, fp16rl_home, write_tiny_model
from fp16rl.precision import PrecisionError
from fp16rl.tasks.arc.cli import app as arc_app
from fp16rl.tasks.arc.data import DatasetError

app = typer.Typer(name="fp16rl", help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(name="models", help="Create and list local models.", no_args_is_help=True)
app.add_typer(models_app)
app.add_typer(arc_app, name="arc")
console = Console(stderr=True)

# Bad input of any kind ends in one line naming the problem and exit code 2.
USER_ERRORS = (ConfigError, ModelError, PrecisionError, DatasetError, FileNotFoundError)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    """Library progress bars and deprecation chatter would bury our own output."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Run GRPO-family RL fine-tuning (`fp16rl train --help` lists every option)."""
    from fp16rl.trainer import Trainer

    _quiet_libraries()
    try:
        config = parse_train_args(ctx.args)
        trainer = Trainer(config)
        console.print(f"run folder: [bold]{trainer.run_dir}[/]  ({trainer.total_steps} steps, "
                      f"sampler {config.sampler_dtype or config.dtype}, trainer {config.trainer_dtype or config.dtype})")
        trainer.train(show_progress=True)
    except USER_ERRORS as err:
        fail(str(err))
    except KeyboardInterrupt:
        console.print("interrupted: the latest checkpoint is kept; continue with --resume")
        raise typer.Exit(130)
    _print_outputs(trainer.run_dir)


def _print_outputs(run_dir: Path) -> None:
    console.print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    console.print(f"tensorboard:  tensorboard --logdir {run_dir / 'tb'}")
    console.print(f"samples:      {run_dir / 'samples'}")
    console.print(f"checkpoints:  {run_dir / 'checkpoints'}")


@models_app.command("tiny")
def models_tiny(
    output: Path = typer.Option(..., "--output", help="Folder to write (must not exist or be empty)."),
    arch: str = typer.Option("llama", help="llama | qwen2"),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Write a tiny randomly initialised model + tokenizer as a normal Hugging Face folder."""
    _quiet_libraries()
    try:
        path = write_tiny_model(output, TinyModelSpec(arch=arch, seed=seed))
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(str(path))


@models_app.command("list")
def models_list() -> None:
    """Models prepared under $FP16RL_HOME/models (usable as --model-path NAME)."""
    root = fp16rl_home() / "models"
    names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not names:
        typer.echo(f"no prepared models in {root}")
    for name in names:
        typer.echo(f"{name}\t{root / name}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo run goes (a fresh sub-folder per call)."),
    steps: int = typer.Option(30, help="Training steps."),
) -> None:
    """A short fp16 GRPO run of the tiny model on the toy task; prints where the results are."""
    from fp16rl.config import TrainConfig
    from fp16rl.trainer import Trainer

    _quiet_libraries()
    run_dir = _fresh_dir(output_dir)
    config = TrainConfig(
        model_path="tiny", dataset_path="toy:digits", output_dir=str(run_dir), dtype="float16", lora_r=0,
        learning_rate=2e-3, num_generations=8, prompts_per_step=4, max_completion_length=24, max_seq_length=256,
        beta=0.0, max_grad_norm=1.0, warmup_ratio=0.0, max_steps=steps, save_steps=steps, logging_steps=5,
        top_p=1.0, seed=0,
    )
    try:
        trainer = Trainer(config)
        console.print(f"demo: fp16 GRPO on toy:digits with the tiny model, {steps} steps -> {run_dir}")
        last = trainer.train(show_progress=True)
    except USER_ERRORS as err:
        fail(str(err))
    console.print(f"final reward/mean {last['reward/mean']:.3f}, mismatch |dlogp| "
                  f"{last['mismatch/logp_abs_diff_mean']:.2e}, precision {trainer.precision_report['observed']}")
    _print_outputs(run_dir)


def _fresh_dir(base: Path) -> Path:
    """``base`` if unused, else ``base-2``, ``base-3``...: a demo never overwrites an earlier one."""
    candidate, index = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
