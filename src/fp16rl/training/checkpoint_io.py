"""The torch state of a run: checkpoint tensors (master weights or adapters, optimizer, scheduler, loss
scaler, RNG states) written and read back, and the global generators seeded. The files' layout, manifest and
checks are ``fp16rl.runs.checkpoint`` (torch-free, so resume is checked before torch loads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fp16rl.core.atomic import atomic_directory
from fp16rl.core.errors import ConfigError
from fp16rl.runs.checkpoint import checkpoint_problem, read_trainer_state, write_manifest


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
    and ``optimizer_state`` a one-process ``optimizer.state_dict()`` (``fp16rl.learner.fsdp`` makes one whole).
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
        write_manifest(tmp)
    return path



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


def seed_everything(seed: int) -> None:
    """Seed the global generators (initialisation of LoRA adapters, anything not derived explicitly)."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
