"""A toy task with a programmatic reward, for smoke runs and tests on the tiny model.

``toy:digits``: the prompt asks for digits; the reward is the fraction of non-space characters
of the completion that are decimal digits. A random tiny model starts near 0.05 and GRPO raises
it within a few dozen steps, which makes the whole loop checkable in seconds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fp16rl.tasks.base import PromptItem, RunProgress, render_chat

from fp16rl.core.scores import Scores

TOY_TASKS = ("digits",)


class DigitsTask:
    """Prompts "Write a sequence of digits ..."; reward = share of digit characters in the answer."""

    name = "toy:digits"
    # Its best answers repeat 4-grams ("0123 0123 ..."): a falling unique-n-gram ratio is the optimum here.
    monitor_rules_off = ("repetition_surge",)

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed

    def batch(self, step: int, num_prompts: int) -> list[PromptItem]:
        rng = np.random.default_rng([self.seed, step])
        items = []
        for slot in range(num_prompts):
            start = int(rng.integers(0, 100))
            question = f"Write a sequence of digits. Count from {start}."
            text = render_chat([{"role": "user", "content": question}], self.tokenizer)
            items.append(PromptItem(text=text, uid=f"digits/{step}-{slot}-{start}", meta={"start": start}))
        return items

    def score(self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool],
              completion_ids: Sequence[list[int]] | None = None, progress: RunProgress | None = None) -> Scores:
        """The digit share of each completion (the step, ``progress``, does not change it)."""
        rewards = [digit_share(text) for text in completions]
        return Scores(rewards=rewards, components={"digits": rewards})

    @property
    def num_steps_per_epoch(self) -> int:
        return 100  # an endless prompt stream; an "epoch" is a nominal 100 steps

    def close(self) -> None:
        pass


def digit_share(text: str) -> float:
    """Fraction of non-whitespace characters that are ASCII digits (0 for an empty answer)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0
