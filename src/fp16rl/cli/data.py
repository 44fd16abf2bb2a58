"""``fp16rl data ...``: dataset tools (perfectible: keep the problems a model can learn from)."""

from __future__ import annotations

import typer

from fp16rl.cli.common import USER_ERRORS, fail, quiet_libraries, skip_bitsandbytes
from fp16rl.cli.options import settings_command
from fp16rl.tools.perfectible import PerfectibleSettings

app = typer.Typer(name="data", help="Dataset tools.", no_args_is_help=True)


def _perfectible(settings: PerfectibleSettings) -> None:
    """Sample every problem --samples times and keep those solved within the --keep pass-rate band
    (the paper's sanity test: a sound algorithm reaches ~100% reward on them). Resumable, deterministic."""
    from fp16rl.tools.perfectible import run_perfectible

    try:
        config = settings.train_config()  # every option checked before the model loads
        skip_bitsandbytes(needed=config.load_in_4bit)
        quiet_libraries()
        summary = run_perfectible(settings, show_progress=True)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"kept {summary['kept']} of {summary['rows']} problems ({summary['skipped_long_prompts']} skipped: "
               f"prompt too long) -> {summary['output']}")


perfectible = settings_command(PerfectibleSettings, _perfectible, fail)
perfectible.__doc__ = _perfectible.__doc__
app.command(name="perfectible")(perfectible)
