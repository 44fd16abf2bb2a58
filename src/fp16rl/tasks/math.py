"""Built-in rewards for math reasoning (the paper's domain), verified with HF's ``math-verify``.

``math``: 1.0 when the completion *states* a final answer that is mathematically equal to the row's
gold answer (its ``answer`` column, or ``solution`` as in TRL's datasets), else 0.0; None (not
scored) when the gold answer itself cannot be parsed, as TRL's ``accuracy_reward`` does.
``math_format``: 1.0 when the completion states its answer in exactly one ``\\boxed{...}``.

What counts as a stated answer (the first form found, in this order):

1. a ``\\boxed{...}``, or a final-answer statement with math-verify's anchors, in LaTeX or plain
   text: "The answer is $22$", "The final answer is 22", "Final answer: 22", "Answer: 22";
2. the last ``<answer>22</answer>`` (the format reasoning-gym's prompts ask for), else a GSM8K line
   ``#### 22``;
3. a last line that is one plain number and nothing else (``22``, ``$-0.5$``, ``1,000.``).

An expression anywhere else in the text never counts (math-verify's unanchored extraction, which
would evaluate "5 + 17" or ``return 5 + 17`` restating "What is 5 + 17?", is not used). And a stated
answer that is still arithmetic to do on plain numbers ("\\boxed{5+17}", "The answer is 2^{10}",
"3 \\cdot 4") pays 0.0: echoing the problem's numbers with their operators is not solving it. A
fraction ``p/q`` and scientific notation ``a \\times 10^k`` (1 <= |a| < 10) are final forms; so is
anything with a symbol, a root or a constant (``\\sqrt{2}``, ``2\\pi``, ``x^2+1``), which has no
shorter exact form. When the gold answer itself is such arithmetic (``2^{10}``), the rule is off
for that row. Compared with TRL's ``accuracy_reward``: the same boxed and LaTeX anchors first; in
addition plain-text statements, ``<answer>`` tags, ``####`` and a lone final number count; an
unevaluated boxed expression, which TRL pays, does not.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Sequence

BOXED = re.compile(r"\\boxed\s*\{")
GSM8K_ANSWER = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # reasoning-gym's and R1-style prompts' format
LONE_NUMBER = re.compile(r"\$?\s*[-+]?\d[\d,]*(?:\.\d+)?\s*\$?\.?")
BOLD = re.compile(r"\*\*(.+?)\*\*")  # markdown bold around an answer hides it from math-verify


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a conversation."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def math_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None,
                solution: Sequence[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 if the completion's stated final answer equals the gold answer (math-verify), 0.0 if not
    (or if it states none, or only arithmetic left to do), None if the gold answer does not parse.

    The gold answer comes from the ``answer`` column, else ``solution`` (TRL's name); either may hold
    a bare answer or a worked solution ending in ``\\boxed{}`` or ``#### answer``. See the module
    docstring for what counts as stated."""
    from math_verify import verify

    golds = answer if answer is not None else solution
    if golds is None:
        raise TypeError("the math reward needs the gold answer in a column named 'answer' or 'solution'")
    rewards: list[float | None] = []
    for completion, gold_value in zip(completions, golds, strict=True):
        gold = parse_gold(gold_value)
        if not gold:
            rewards.append(None)
            continue
        predicted = stated_answer(completion_text(completion))
        if predicted and left_to_compute(predicted) and not left_to_compute(gold):
            predicted = []
        equal = bool(predicted) and verify(gold, predicted, timeout_seconds=_timeout(5))
        rewards.append(1.0 if equal else 0.0)
    return rewards


def _timeout(seconds: int) -> int | None:
    """math-verify's time limit, or None off the main thread, where its ``signal.alarm`` cannot run; its
    per-call notice that the limit is off is then silenced, as TRL's accuracy reward does."""
    if threading.current_thread() is threading.main_thread():
        return seconds
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return None


def math_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion gives its answer in exactly one ``\\boxed{...}``, else 0.0."""
    return [1.0 if len(BOXED.findall(completion_text(c))) == 1 else 0.0 for c in completions]


def parse_gold(value: Any) -> list[Any]:
    """The gold answer parsed by math-verify: a GSM8K solution's ``####`` tail, else the text; a bare
    formula (no ``$``, no words outside LaTeX commands) is read as LaTeX, as inside ``$...$``, so
    ``x^2+1`` and ``\\sqrt{2}`` parse."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = str(value)
    tails = GSM8K_ANSWER.findall(text)
    text = tails[-1] if tails else text
    if "$" not in text and not re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", text)):
        text = f"${text}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout(5))


def stated_answer(text: str) -> list[Any]:
    """math-verify's parse of the answer ``text`` states (see the module docstring), or [] if none."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = BOLD.sub(r"\1", text)
    anchored = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
                ExprExtractionConfig(try_extract_without_anchor=False)]
    found = parse(text, extraction_config=anchored, extraction_mode="first_match", parsing_timeout=_timeout(5))
    if found:
        return found
    tails = ANSWER_TAG.findall(text) or GSM8K_ANSWER.findall(text)
    lines = [line.strip() for line in text.strip().splitlines()]
    tail = tails[-1] if tails else (lines[-1] if lines and LONE_NUMBER.fullmatch(lines[-1]) else None)
    if tail is None:
        return []
    return parse(tail, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 extraction_mode="first_match", parsing_timeout=_timeout(5))


def left_to_compute(parsed: Sequence[Any]) -> bool:
    """True when a parsed answer holds arithmetic on plain numbers still to be done: a sum, product or
    integer power whose operands are all rational numbers, other than a fraction or scientific notation."""
    import sympy

    return any(_arithmetic_inside(expr) for expr in parsed if isinstance(expr, sympy.Basic))


def _arithmetic_inside(node: Any) -> bool:
    import sympy

    if isinstance(node, (sympy.Add, sympy.Mul, sympy.Pow)) and _rational_arithmetic(node):
        return not _final_form(node)
    return any(_arithmetic_inside(arg) for arg in node.args)


def _rational_arithmetic(node: Any) -> bool:
    """``node`` is built from rational numbers by +, * and integer powers (so it evaluates to one number)."""
    import sympy

    if isinstance(node, sympy.Number):
        return True
    if isinstance(node, sympy.Pow):
        return bool(node.exp.is_Integer) and _rational_arithmetic(node.base)
    if isinstance(node, (sympy.Add, sympy.Mul)):
        return all(_rational_arithmetic(arg) for arg in node.args)
    return False


def _final_form(node: Any) -> bool:
    """A fraction ``p/q`` (``1/q`` is ``Pow(q, -1)``) or ``a * 10^k`` with 1 <= |a| < 10: how answers are written."""
    import sympy

    if isinstance(node, sympy.Pow):
        return node.exp == -1 and isinstance(node.base, sympy.Integer)
    if isinstance(node, sympy.Mul) and len(node.args) == 2:
        first, second = node.args
        if isinstance(first, sympy.Integer) and _final_form(second):
            return True
        return (isinstance(first, sympy.Number) and 1 <= abs(first) < 10 and isinstance(second, sympy.Pow)
                and second.base == 10 and bool(second.exp.is_Integer))
    return False
