"""What a run tells its user before it starts (config.yaml's ``notes``, logged as warnings) and the
precision a resume must keep: checks of the whole run's set-up, kept out of the loop (``trainer.py``)."""

from __future__ import annotations

from typing import Any

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.core.errors import ConfigError
from fp16rl.model.hardware import emulation_notes
from fp16rl.model.precision import PrecisionPolicy


def run_notes(config: TrainConfig, policy: PrecisionPolicy, device: torch.device, algorithm_notes: list[str],
              several_ranks: bool, threads_note: str | None, rope_note: str | None) -> list[str]:
    """Warnings a user should read before the run: settings that work against each other, slow dtypes."""
    notes = emulation_notes({policy.sampler_dtype, policy.trainer_dtype}, device)
    if config.importance_sampling_level == "sequence" and config.loss_type != "grpo":
        notes.append(f"--importance-sampling-level sequence with --loss-type {config.loss_type} weights each "
                     "sequence by its length instead of optimising GSPO's per-sequence objective; GSPO uses "
                     "--loss-type grpo")
    notes.extend(algorithm_notes)
    if config.fsdp and not several_ranks:
        notes.append("--fsdp shards over the ranks of a torchrun launch; in one process it changes nothing")
    if threads_note is not None:
        notes.append(threads_note)
    if rope_note is not None:
        notes.append(f"the mismatch includes a RoPE-scaling difference, not only precision: {rope_note}, "
                     "and the sampler's cached decoding takes them from the positions decoded so far, the "
                     "trainer's forward from the whole sequence, so mismatch/* is not zero even in float32 "
                     "(summary.json: mismatch_includes_rope_scaling)")
    return notes


def check_resumed_precision(policy: PrecisionPolicy, stored: dict[str, Any] | None, checkpoint: Any) -> None:
    """Refuse a checkpoint written under another declared precision: a run keeps its precision."""
    declared = (stored or {}).get("declared") or {}
    now = policy.describe()
    for key, value in declared.items():
        if key in now and now[key] != value:
            raise ConfigError(f"checkpoint {checkpoint} was written with {key}={value}, this run has {key}="
                              f"{now[key]}; a run keeps its precision (start a new run to change it)")
