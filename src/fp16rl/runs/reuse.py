"""A run folder that holds nothing worth keeping: a run that ended before its first logged step.

A run that fails at step 1 (a reward function that raises, an out-of-memory) or is stopped during
start-up leaves ``config.yaml``, an empty ``metrics.jsonl``, tracker folders and ``summary.json``,
but no checkpoint: it cannot be resumed, and the output-folder check (never write into a folder in
use) would refuse it for a new run too. Such a folder is reused instead, under rules that keep
anything of value:

- every entry is a name a run writes (``RUN_ENTRIES``): a file the user put there makes it a folder
  in use, as before;
- no checkpoint (a save's torn temporary folder does not count) and no sample file;
- ``metrics.jsonl`` missing or empty: no step was logged, so no result is lost;
- ``summary.json`` says the run ended (failed or interrupted): a live run writes it only when it
  stops, so a run still starting up in that folder is never taken for a leftover.

Only the names in ``RUN_ENTRIES`` are ever deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fp16rl.runs.checkpoint import checkpoint_dirs

logger = logging.getLogger("fp16rl")

# Everything a run writes into its folder, trackers' folders included.
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "summary.json", "samples", "checkpoints", "tb", "wandb",
                         "trackio", "mlruns"})
ENDED = ("failed", "interrupted")


def holds_nothing_of_value(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run writes before its first step is logged (see the module)."""
    if not run_dir.is_dir():
        return False
    entries = list(run_dir.iterdir())
    if not entries or any(p.name not in RUN_ENTRIES for p in entries) or checkpoint_dirs(run_dir):
        return False
    metrics, samples, checkpoints = run_dir / "metrics.jsonl", run_dir / "samples", run_dir / "checkpoints"
    if metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0):
        return False
    if samples.exists() and (not samples.is_dir() or any(samples.iterdir())):
        return False
    return not (checkpoints.exists() and (not checkpoints.is_dir()
                                          or any(not p.name.startswith(".step-") for p in checkpoints.iterdir())))


def ended_before_step_one(run_dir: Path) -> str | None:
    """The status (failed | interrupted) of a run in ``run_dir`` that ended before its first logged
    step and left nothing of value; None for any other folder."""
    if not holds_nothing_of_value(run_dir):
        return None
    try:
        status = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status if status in ENDED else None


def discard_run_entries(run_dir: Path) -> None:
    """Delete what a run wrote into ``run_dir`` (the names in ``RUN_ENTRIES`` only); the folder stays."""
    for name in sorted(RUN_ENTRIES):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def reuse(run_dir: Path, status: str) -> None:
    """Empty the folder of a run that ended (``status``) before its first step, saying so."""
    logger.warning(f"{run_dir} holds a run that {status} before its first step and saved nothing to resume; "
                   "reusing the folder")
    discard_run_entries(run_dir)
