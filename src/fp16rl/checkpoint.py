"""Checkpoints that make resume exact: FP32 master weights or adapters (safetensors), optimizer,
scheduler, loss scaler, RNG states and the data position (= the step), written atomically and
durably, with a manifest of every file's size and SHA-256 so a torn or corrupted checkpoint is
refused with a clear message instead of being half-loaded."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fp16rl.atomic import atomic_directory
from fp16rl.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are written or read: resume checks run without it
    import torch

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


def _write_manifest(folder: Path) -> None:
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    more_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and durably; ``weights`` are the FP32 masters (whole)
    and ``optimizer_state`` a one-process ``optimizer.state_dict()`` (``fp16rl.fsdp`` makes one whole).
    ``more_weights``: other trainable models' FP32 masters by name, written to ``<name>.safetensors``
    (PPO's critic: ``critic.safetensors``; its optimizer state is in the one optimizer's)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    path = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_directory(path) as tmp:
        save_file({name: t.detach().contiguous() for name, t in weights.items()}, str(tmp / "trainable.safetensors"))
        for key, tensors in (more_weights or {}).items():
            save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(tmp / f"{key}.safetensors"))
        if hasattr(model, "peft_config"):  # a standard peft adapter folder too, loadable by PeftModel
            model.save_pretrained(tmp / "adapter")
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            },
            tmp / "training_state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _write_manifest(tmp)
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The small JSON part of a checkpoint (step, precision report, counters), checked."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint {path} is corrupt: trainer_state.json cannot be read ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ConfigError(f"checkpoint {path} is corrupt: trainer_state.json has no step")
    return state


def load_checkpoint(
    path: Path,
    load_weights: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    load_more: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (step, ...).

    ``load_weights(tensors, source)`` puts the FP32 masters in place, ``load_more[name]`` those of
    ``<name>.safetensors`` (a checkpoint without that file is refused: it was written by another algorithm). Any failure is a
    ``ConfigError`` naming the checkpoint: resume refuses a checkpoint it cannot fully restore.
    """
    import numpy as np
    import torch
    from safetensors.torch import load_file

    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"checkpoint {path} is corrupt: {problem}; remove it to resume from the one before")
    state = read_trainer_state(path)
    try:
        load_weights(load_file(str(path / "trainable.safetensors")), f"checkpoint {path}")
        for key, load in (load_more or {}).items():
            if not (path / f"{key}.safetensors").is_file():
                raise ConfigError(f"checkpoint {path} has no {key}.safetensors (written by a run without a {key}); "
                                  "it cannot resume this run")
            load(load_file(str(path / f"{key}.safetensors")), f"checkpoint {path}")
        # numpy/python RNG states hold non-tensor objects; this file is our own, written by save_checkpoint.
        blob = torch.load(path / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["rng"]["torch"])
        np.random.set_state(blob["rng"]["numpy"])
        random.setstate(blob["rng"]["python"])
    except ConfigError:
        raise
    except Exception as err:  # safetensors, pickle and state-dict errors come in many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"checkpoint {path} cannot be restored: {first}") from None
    return state
