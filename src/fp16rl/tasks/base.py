"""The seam between the RL loop and a workload: where prompts come from and how completions score.

A task is fully deterministic given ``(seed, step)``: the loop asks ``task.batch(step, n)`` for the
prompts of optimizer step ``step``. That makes resume exact (the data position *is* the step) and
makes bf16-vs-fp16 arms paired (same seed -> same prompts and augmentations in every arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt (or a completion). No special tokens are added: the chat template
    already placed them, and a second BOS would make a different prompt than the one rendered."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PromptItem:
    """One prompt of a step: the text fed to the sampler plus what the reward needs to score it."""

    text: str  # fully rendered prompt (chat template already applied)
    uid: str  # stable id, e.g. "task_id/aug-seed"; used in samples/ and for pairing checks
    meta: dict[str, Any] = field(default_factory=dict)  # task payload for scoring (grids, target, ...)


@dataclass
class Scores:
    """Rewards of a batch of completions, aligned with the completions passed in."""

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)  # -> reward/<fn>/mean
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-step metrics, canonical names
    details: list[dict[str, Any]] = field(default_factory=list)  # per completion, for samples/


@runtime_checkable
class Task(Protocol):
    """A workload: prompts for a step and rewards for completions."""

    name: str

    @property
    def num_steps_per_epoch(self) -> int:
        """Optimizer steps that visit every prompt once (sets the run length from --epochs)."""
        ...

    def batch(self, step: int, num_prompts: int) -> list[PromptItem]:
        """Prompts of optimizer step ``step`` (0-based); a pure function of the task seed and step."""
        ...

    def score(
        self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool]
    ) -> Scores:
        """Score ``completions[i]`` written for ``items[i]``."""
        ...

    def close(self) -> None:
        """Release workers (sandbox pools); called once at the end of a run."""
        ...
