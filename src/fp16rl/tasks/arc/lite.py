"""arc-lite: the RL side of the recipe that makes the built-in tiny model an ARC code-RL subject (demo, tests).

A random tiny model writes no runnable code, so RL would see only zero rewards. The recipe warm-starts
it (``fp16rl.tools.arc_lite``) on synthetic arc-lite tasks with reference programs, then trains with RL
on the held-out tasks and options here. Everything is cached under ``fp16rl_home()``, built on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fp16rl.core.atomic import atomic_directory
from fp16rl.core.paths import fp16rl_home
from fp16rl.tasks.arc.synthetic import write_synthetic


# The RL tasks of the demo, held out from the warm start (another seed). Seed 11's first four
# tasks are geometric rules (flip left-right twice, a rotation, identity) that the warm model
# solves in a few percent of its samples (3-12% in the first steps), so a short run has rewards to
# select from and room to rise; rules with colour parameters are solved too rarely for 20 steps.
ARC_LITE_RL_TASKS = 4
ARC_LITE_RL_SEED = 11


def arc_lite_dataset(
    num_tasks: int = ARC_LITE_RL_TASKS, seed: int = ARC_LITE_RL_SEED, min_side: int = 3, max_side: int = 5
) -> Path:
    """An arc-lite task map (``.json.gz`` plus its programs side file), cached under
    ``fp16rl_home()/data`` and written on first use."""
    folder = fp16rl_home() / "data" / f"arc-lite-n{num_tasks}-s{seed}-g{min_side}x{max_side}"
    path = folder / "arc-lite.json.gz"
    if not path.is_file():
        with atomic_directory(folder) as tmp:
            write_synthetic(tmp / path.name, num_tasks, seed, min_side, max_side)
    return path


# TrainConfig options of the arc-lite demo run (with the two paths above): fp16 on both sides,
# full fine-tuning, no KL, every task of the dataset in every step (4 prompts x 8 completions).
ARC_LITE_RL_OPTIONS: dict[str, Any] = dict(
    reward_name="arc-v2-no-pixel-score",
    grid_encoder="digits",
    use_data_augmentation=False,  # the same four prompts every step: the short run learns them
    dtype="float16",
    lora_r=0,
    learning_rate=1e-3,
    max_grad_norm=1.0,
    warmup_ratio=0.0,
    beta=0.0,
    num_generations=8,
    prompts_per_step=4,
    max_completion_length=192,  # reference programs take <= 165 tokens
    mask_truncated_completions=True,
    temperature=1.0,
    top_p=1.0,
    n_jobs=2,
    max_steps=20,
)
