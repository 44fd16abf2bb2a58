"""Built-in rewards for math reasoning (the paper's domain), verified with HF's ``math-verify``.

``math``: 1.0 when the completion's final answer (a ``\\boxed{...}`` or, failing that, the last
expression) is mathematically equal to the row's ``answer`` column, else 0.0; None (not scored)
when the gold answer itself cannot be parsed, as TRL's accuracy reward does. ``math_format``: 1.0
when the completion states its answer in exactly one ``\\boxed{...}``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

BOXED = re.compile(r"\\boxed\s*\{")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a conversation."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def math_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the completion's answer equals the gold ``answer`` (math-verify), 0.0 if not, None if the
    gold answer does not parse. Needs an ``answer`` column."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    rewards: list[float | None] = []
    for completion, gold_value in zip(completions, answer):
        gold_text = str(gold_value)
        if "$" not in gold_text and "\\" not in gold_text:
            gold_text = f"${gold_text}$"  # a bare number or expression: let the LaTeX extractor see it
        gold = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
        if not gold:
            rewards.append(None)
            continue
        predicted = parse(completion_text(completion),
                          extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
        rewards.append(1.0 if predicted and verify(gold, predicted) else 0.0)
    return rewards


def math_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion gives its answer in exactly one ``\\boxed{...}``, else 0.0."""
    return [1.0 if len(BOXED.findall(completion_text(c))) == 1 else 0.0 for c in completions]
