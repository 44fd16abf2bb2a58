"""Checkpoints that make resume exact: weights or adapter (safetensors), optimizer, scheduler,
loss scaler, RNG states and the data position (= the step), written atomically."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fp16rl.atomic import atomic_directory

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a crashed save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes: LoRA adapters, or every parameter for full fine-tuning."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and return it."""
    path = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_directory(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if hasattr(model, "peft_config"):  # a standard peft adapter folder too, loadable by PeftModel
            model.save_pretrained(tmp / "adapter")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
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
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (step, ...)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: unknown weights {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    # numpy/python RNG states hold non-tensor objects; this file is our own, written by save_checkpoint.
    blob = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return json.loads((path / "trainer_state.json").read_text())
