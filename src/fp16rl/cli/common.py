"""What every command shares: the one way to fail (an ``error:`` line, exit 2) and fp16rl's warnings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fp16rl.core.atomic import atomic_write_text
from fp16rl.core.errors import UserError
from fp16rl.core.ranks import is_main_process

console = Console(stderr=True)
# Bad input of any kind ends in one line naming the problem and exit code 2.
USER_ERRORS = (UserError, FileNotFoundError)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


RANK0_GRACE_S = 20.0  # how long a refusing rank other than 0 waits for rank 0 to refuse (and be reported) first


def fail(message: object) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with code 2 (bad input). Under torchrun
    only rank 0 prints it: the ranks fail together, and one line says why."""
    print_error(message)
    raise typer.Exit(2)


def print_error(message: object) -> None:
    """The printing half of :func:`fail`, for a caller outside a command (the console script's handler)."""
    record_for_launcher(f"error: {one_line(message)}")
    if not is_main_process():
        # torchrun stops every rank as soon as one exits: leaving at once could kill rank 0 (on a slow
        # machine still importing) before its line is printed. Rank 0 exits first instead; torchrun
        # then stops this rank, and its report names rank 0's line as the root cause.
        time.sleep(RANK0_GRACE_S)
        return
    console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def record_for_launcher(line: str) -> None:
    """Under torchrun, write ``line`` where its failure report looks for a rank's error.

    torchrun answers any rank's non-zero exit with its own report and traceback (``ChildFailedError``,
    raised in the launcher process: no rank can prevent it) and exits 1. With this file (torchelastic's
    ``TORCHELASTIC_ERROR_FILE``, in the format of its ``ErrorHandler.record_exception``) the report's
    root cause is this line instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):  # only an aid to torchrun's report: the error line is printed anyway
            atomic_write_text(Path(path), json.dumps(record))


class _OneLineWarnings(logging.Handler):
    """fp16rl's warnings (slow dtypes, settings that work against each other, collapses) as one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[bold yellow]warning:[/] {escape(one_line(record.getMessage()))}", highlight=False,
                      soft_wrap=True)


def install_warning_handler() -> None:
    logger = logging.getLogger("fp16rl")
    if not any(isinstance(h, _OneLineWarnings) for h in logger.handlers):
        logger.addHandler(_OneLineWarnings())
    logger.propagate = False


_OWN_PROCESS = False  # set by the console script (``fp16rl.cli.main``): this process runs one command


def own_process() -> None:
    """Say that this process runs one command and exits (the console script, never an in-process caller
    such as typer's ``CliRunner``), so a command may make process-wide choices (``skip_bitsandbytes``)."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def skip_bitsandbytes(needed: bool) -> None:
    """For a command that will not quantise (``needed`` False) in a process of its own: mark bitsandbytes
    absent (a ``sys.modules`` entry of None, Python's documented way to halt an import), so that peft,
    which imports it whenever it is installed, sees it unavailable. That import costs ~1-3 s of every
    run's start-up on a CPU: bitsandbytes wraps its kernels in ``torch.compile`` at import, which loads
    inductor. Nothing changes once peft or bitsandbytes is loaded, or in a process that runs more."""
    if _OWN_PROCESS and not needed and "peft" not in sys.modules:
        sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]


def quiet_libraries() -> None:
    """Library progress bars and deprecation chatter would bury our own output."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
