"""The seam between the RL loop and a workload: where prompts come from and how completions score.

A task is fully deterministic given ``(seed, step)``: the loop asks ``task.batch(step, n)`` for the
prompts of optimizer step ``step``. That makes resume exact (the data position *is* the step) and
makes bf16-vs-fp16 arms paired (same seed -> same prompts and augmentations in every arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from fp16rl.core.errors import ConfigError
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


def has_chat_template(tokenizer: Any | None) -> bool:
    """Whether ``tokenizer`` can render a conversation (``apply_chat_template`` needs a template)."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: Any, system_prompt: str | None = None) -> str:
    """The text the sampler continues for a dataset prompt, as TRL 1.16's GRPOTrainer builds it: a conversation
    (a list of ``{"role", "content"}`` messages) through the model's chat template with
    ``add_generation_prompt=True`` whatever its last turn, a plain-text prompt as it is, after the special
    tokens the tokenizer puts before any text (TRL tokenizes a text prompt with them: a BOS for Llama- or
    Gemma-style tokenizers, nothing for most others).

    A conversation ending on an assistant turn is therefore not continued: TRL's ``_tokenize_prompts`` calls
    ``processing_class.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True)`` for every
    conversational prompt, so the template closes that turn (ChatML: ``<|im_end|>``) and opens a new
    assistant turn. (``trl.data_utils.maybe_apply_chat_template`` would continue it, but GRPOTrainer uses that
    only for the image inputs of vision models, never for the prompt ids.) fp16rl's own tasks that prefill
    the assistant's answer (ARC) continue it with :func:`render_chat`.

    ``system_prompt`` (fp16rl's ``--system-prompt``; TRL has none) is put first as a system turn, which makes
    a text prompt a conversation: the text becomes the user's turn. A conversation needs a chat template:
    without one it is refused (``ConfigError``), never rendered in a made-up layout."""
    if isinstance(prompt, str) and system_prompt is None:
        return special_prefix(tokenizer) + prompt
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": str(m["role"]), "content": str(m["content"])} for m in turns]
    if not has_chat_template(tokenizer):
        raise ConfigError(chat_template_missing(isinstance(prompt, str)))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_template_missing(text_prompts: bool) -> str:
    """Why prompts that need a chat template cannot be rendered with a tokenizer that has none."""
    what = ("--system-prompt makes each prompt a conversation (a system turn, then the prompt as the user's)"
            if text_prompts else "the prompts are conversations (lists of {role, content} messages)")
    return (f"{what}, but the model's tokenizer has no chat template to render them; use a model with one, "
            "set the tokenizer's chat_template, or give plain-text prompts (fed to the model as they are)")


def special_prefix(tokenizer: Any) -> str:
    """The special tokens ``tokenizer`` puts before any text it encodes, as text (``""`` for most tokenizers,
    the BOS for Llama- or Gemma-style ones): prepended to a plain-text prompt, they make the ids
    :func:`encode_text` gives those of ``tokenizer(prompt)``, which TRL feeds the model."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return "".join(tokenizer.convert_ids_to_tokens(full[:start]))
    return ""


@dataclass
class PromptItem:
    """One prompt of a step: the text fed to the sampler plus what the reward needs to score it."""

    text: str  # fully rendered prompt (chat template already applied)
    uid: str  # stable id, e.g. "task_id/aug-seed"; used in samples/ and for pairing checks
    meta: dict[str, Any] = field(default_factory=dict)  # task payload for scoring (grids, target, ...)


@dataclass(frozen=True)
class RunProgress:
    """Where the run stands when a batch is scored: what TRL gives reward functions as ``trainer_state``.

    ``global_step``: the steps completed before this batch (one step = one generation batch, as the run's
    ``max_steps`` counts them; 0 on the first step), TRL's ``state.global_step`` when it generates;
    ``max_steps``: the run's length in those steps (0: not in a run, e.g. ``fp16rl data perfectible``)."""

    global_step: int = 0
    max_steps: int = 0


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
        completion_ids: Sequence[list[int]] | None = None, progress: RunProgress | None = None,
    ) -> Scores:
        """Score ``completions[i]`` (token ids ``completion_ids[i]``) written for ``items[i]``; ``progress``: the
        step being scored (None: outside a run), which reward functions of prompt datasets see."""
        ...

    def close(self) -> None:
        """Release workers (sandbox pools); called once at the end of a run."""
        ...
