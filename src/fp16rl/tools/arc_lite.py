"""The arc-lite warm model: the built-in tiny model, warm-started (``fp16rl.tools.sft``) on synthetic
arc-lite tasks with reference programs so that RL on held-out tasks has rewards to select from. Cached under
``fp16rl_home()`` and built on first use; the RL side of the recipe is ``fp16rl.tasks.arc.lite``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fp16rl.core.paths import fp16rl_home
from fp16rl.model.loading import TinyModelSpec, load_tokenizer, tiny_model_path
from fp16rl.tasks.arc.encoders import DigitEncoder
from fp16rl.tasks.arc.synthetic import generate_tasks, sft_pairs


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
    from fp16rl.tools.sft import warm_start

    return warm_start(base, pairs, path, settings.steps, settings.learning_rate, settings.batch_size, settings.seed,
                      show_progress)
