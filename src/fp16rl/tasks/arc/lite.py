"""arc-lite: the recipe that makes the built-in tiny model an ARC code-RL subject (demo, tests).

A random tiny model writes no runnable code, so RL would see only zero rewards. The recipe warm-starts
it (``sft.warm_start``) on synthetic arc-lite tasks with reference programs, then trains with RL on
held-out tasks it sometimes solves. Everything is cached under ``fp16rl_home()`` and built on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fp16rl.atomic import atomic_directory
from fp16rl.models import TinyModelSpec, load_tokenizer, tiny_model_path
from fp16rl.paths import fp16rl_home
from fp16rl.tasks.arc.encoders import DigitEncoder
from fp16rl.tasks.arc.synthetic import generate_tasks, sft_pairs, write_synthetic



@dataclass(frozen=True)
class ArcLiteSettings:
    """Everything the cached arc-lite warm model depends on; its cache name encodes all of it."""

    num_tasks: int = 256  # warm-start tasks (seed ``seed``): held out from the RL tasks below
    seed: int = 0  # generator seed of the warm-start tasks and seed of the SFT run
    min_side: int = 3
    max_side: int = 5  # small grids keep prompts short (~670 tokens, 470 of them fixed text)
    steps: int = 300
    learning_rate: float = 1e-2
    batch_size: int = 8
    # The default 64-wide, 2-layer tiny model: after 300 steps ~60% of its samples run. A 128-wide
    # one (300 steps) ran no more often and cost ~3x per step, so the small one is the cheap choice.
    model: TinyModelSpec = field(default_factory=TinyModelSpec)

    @property
    def name(self) -> str:
        m = self.model
        return (f"arc-lite-warm-{m.arch}-h{m.hidden_size}-l{m.num_hidden_layers}-v{m.vocab_size}-s{m.seed}"
                f"-n{self.num_tasks}-d{self.seed}-g{self.min_side}x{self.max_side}"
                f"-st{self.steps}-lr{self.learning_rate:g}-b{self.batch_size}")


def arc_lite_warm_model(
    settings: ArcLiteSettings = ArcLiteSettings(), output_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Path:
    """The warm-started tiny model for arc-lite (digits encoder, default prompt template), cached
    under ``fp16rl_home()/models/<settings.name>`` and built on first use; or built at ``output_dir``."""
    path = Path(output_dir) if output_dir is not None else fp16rl_home() / "models" / settings.name
    if output_dir is None and (path / "config.json").is_file():
        return path
    base = tiny_model_path(settings.model)
    tasks, programs = generate_tasks(settings.num_tasks, settings.seed, settings.min_side, settings.max_side)
    pairs = list(sft_pairs(tasks, programs, load_tokenizer(base), DigitEncoder()))
    from fp16rl.sft import warm_start

    return warm_start(base, pairs, path, settings.steps, settings.learning_rate, settings.batch_size, settings.seed,
                      show_progress)


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
