"""The seam between the RL loop and a workload: where prompts come from and how completions score.

A task is fully deterministic given ``(seed, step)``: the loop asks ``task.batch(step, n)`` for the
prompts of optimizer step ``step``. That makes resume exact (the data position *is* the step) and
makes bf16-vs-fp16 arms paired (same seed -> same prompts and augmentations in every arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from fp16rl.core.scores import Scores


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt (or a completion). No special tokens are added: the chat template
    already placed them, and a second BOS would make a different prompt than the one rendered."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of an already rendered prompt (special tokens are in the text, none added)."""
    return len(encode_text(tokenizer, text))


def render_chat(messages: list[dict[str, str]], tokenizer: Any | None) -> str:
    """Prompt text of a conversation, with the model's chat template when it has one: a final assistant
    message stays open (the completion continues it), otherwise the assistant turn is opened."""
    open_turn = messages[-1]["role"] == "assistant"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        if open_turn:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)  # base models
    return text if open_turn else text + "\n\nAssistant:"


@dataclass
class PromptItem:
    """One prompt of a step: the text fed to the sampler plus what the reward needs to score it."""

    text: str  # fully rendered prompt (chat template already applied)
    uid: str  # stable id, e.g. "task_id/aug-seed"; used in samples/ and for pairing checks
    meta: dict[str, Any] = field(default_factory=dict)  # task payload for scoring (grids, target, ...)


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
        self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool],
        completion_ids: Sequence[list[int]] | None = None,
    ) -> Scores:
        """Score ``completions[i]`` (token ids ``completion_ids[i]``) written for ``items[i]``."""
        ...

    def close(self) -> None:
        """Release workers (sandbox pools); called once at the end of a run."""
        ...
