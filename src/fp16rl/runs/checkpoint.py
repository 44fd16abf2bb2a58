"""Checkpoint folders that make resume exact: FP32 master weights or adapters (safetensors), optimizer,
scheduler, loss scaler, RNG states and the data position (= the step), with a manifest of every file's
size and SHA-256 so a torn or corrupted checkpoint is refused with a clear message instead of being
half-loaded. This module lists, checks and prunes them without torch; ``fp16rl.training.checkpoint_io``
writes (atomically and durably) and reads the tensors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fp16rl.core.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a crashed save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_torn_saves(run_dir: Path) -> None:
    """Delete the temporary folders a save that was killed left behind (``checkpoints/.step-N.*``)."""
    root = Path(run_dir) / "checkpoints"
    for leftover in root.glob(".step-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)


def prune_checkpoints(run_dir: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints (never ``keep``, the one a run resumed from).

    A checkpoint is renamed to a temporary name before it is deleted, so a crash mid-deletion never
    leaves something that looks like a checkpoint."""
    found = checkpoint_dirs(run_dir)
    doomed = [p for p in found[:-limit] if keep is None or p.resolve() != Path(keep).resolve()]
    for path in doomed:
        trash = path.with_name(f".{path.name}.deleting")
        os.rename(path, trash)
        shutil.rmtree(trash)
    return doomed


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a missing, truncated or altered file), or None."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        required = ("trainable.safetensors", "training_state.pt", "trainer_state.json")
        missing = [name for name in required if not (path / name).is_file()]
        return f"{missing[0]} is missing" if missing else None  # written before manifests existed
    try:
        entries = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{MANIFEST} is not valid JSON"
    for name, expected in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _digest(file) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The small JSON part of a checkpoint (step, precision report, counters), checked."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint {path} is corrupt: trainer_state.json cannot be read ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ConfigError(f"checkpoint {path} is corrupt: trainer_state.json has no step")
    return state


