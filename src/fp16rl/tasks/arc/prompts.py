"""Prompt construction: [system, user, assistant-prefix] messages rendered with the chat template.

The assistant turn is left open after its prefix (``continue_final_message=True``), so the model's
first sampled token continues the sentence announcing reasoning followed by Python code.
Tokenizers without a chat template get a plain ``System:/User:/Assistant:`` layout instead.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from fp16rl.tasks.arc.data import ArcTaskData
from fp16rl.tasks.base import render_chat
from fp16rl.tasks.arc.encoders import COLOR_NAMES, GridEncoder

_LEGEND = ", ".join(f"{value} {name}" for value, name in enumerate(COLOR_NAMES))

DEFAULT_SYSTEM = (
    "You are a world-class puzzle solver with sharp pattern-recognition skills and expert "
    "Python programming ability. You study examples closely, infer the hidden rule that "
    "explains all of them, and express that rule as clean, correct code."
)

DEFAULT_USER = (
    "Here is a grid puzzle. Each grid is a 2D array written as text: cells are separated by "
    "spaces and rows by newlines. In code a grid is a list of rows, each a list of integers "
    f"0-9, where the colours are {_LEGEND}.\n\n"
    "The examples below all follow the same transformation rule.\n\n"
    "{examples}"
    "## Test input\n\n{test_input}\n\n"
    "Write a Python function `transform(grid)` that maps any input grid of this puzzle to its "
    "output grid, returning a list of lists of integers. Put the code in one ```python block."
)

DEFAULT_EXAMPLE = "## Example {index}\n\nInput:\n{input}\n\nOutput:\n{output}\n\n"

DEFAULT_ASSISTANT_PREFIX = (
    "I will first reason about the rule that turns each input into its output, "
    "and then write Python code (with numpy where it helps) that implements it."
)


@dataclass(frozen=True)
class PromptTemplate:
    """The prompt texts. ``user`` is a ``str.format`` template with ``{examples}`` and
    ``{test_input}``; ``example`` has ``{index}`` (1-based), ``{input}`` and ``{output}``
    (literal braces in either must be doubled). ``system`` and ``assistant_prefix`` are verbatim."""

    system: str = DEFAULT_SYSTEM
    user: str = DEFAULT_USER
    example: str = DEFAULT_EXAMPLE
    assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX

    def __post_init__(self) -> None:
        _require_fields("user", self.user, {"examples", "test_input"})
        _require_fields("example", self.example, {"input", "output"})


def _require_fields(what: str, template: str, required: set[str]) -> None:
    """Reject a template that would silently drop the grids (missing or unknown placeholders)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"prompt template '{what}': {exc}") from exc
    if not required <= fields:
        raise ValueError(f"prompt template '{what}' lacks placeholders {sorted(required - fields)}")


def build_messages(
    task: ArcTaskData, test_index: int, encoder: GridEncoder, template: PromptTemplate
) -> list[dict[str, str]]:
    """Chat messages showing all train pairs and test input ``test_index``, ending in the prefix."""
    examples = "".join(
        template.example.format(
            index=i, input=encoder.encode(pair["input"]), output=encoder.encode(pair["output"])
        )
        for i, pair in enumerate(task["train"], start=1)
    )
    test_input = encoder.encode(task["test"][test_index]["input"])
    return [
        {"role": "system", "content": template.system},
        {"role": "user", "content": template.user.format(examples=examples, test_input=test_input)},
        {"role": "assistant", "content": template.assistant_prefix},
    ]


def render_messages(messages: list[dict[str, str]], tokenizer: Any | None) -> str:
    """Prompt text with the assistant turn left open after its prefix."""
    return render_chat(messages, tokenizer)
