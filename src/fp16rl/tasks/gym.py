"""Procedural reasoning data from ``reasoning-gym``, scored by its own verifiers (no downloads).

``--dataset-path reasoning-gym:<name>`` (e.g. ``basic_arithmetic``, ``chain_sum``, ``leg_counting``,
``countdown``), with the generator's options after ``?`` (``reasoning-gym:chain_sum?max_digits=1``), generates ``--dataset-size`` problems from ``--dataset-seed``; each row holds the
conversation (``prompt``: the system prompt, then the question), the reference ``answer`` and the whole
entry as JSON (``gym_entry``), so a file
written from these rows (``fp16rl data perfectible``) is scored the same way later. The reward
``reasoning_gym`` extracts the ``<answer>...</answer>`` of a completion and scores it with the
entry's dataset's ``score_answer``; the default system prompt is reasoning-gym's, which asks for
that format.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from fp16rl.core.errors import DatasetError
from fp16rl.tasks.math import completion_text

PREFIX = "reasoning-gym:"
DEFAULT_SIZE = 1000


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name?key=value&key=value`` -> (name, generator options); values read as YAML scalars
    (``max_digits=1`` is an int, ``allow_negation=false`` a bool, ``operators=[+,-]`` a list)."""
    import yaml

    name, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise DatasetError(f"--dataset-path {PREFIX}{spec}: option {pair!r} is not key=value")
        try:
            options[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise DatasetError(f"--dataset-path {PREFIX}{spec}: option {key!r} has an unreadable value {text!r}") from None
    return name, options


def gym_rows(spec: str, size: int, seed: int, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """``size`` problems of the reasoning-gym dataset ``spec`` names (``name`` or ``name?key=value&...``
    with the generator's own options, e.g. ``chain_sum?max_terms=2&max_digits=1``), deterministic in
    ``seed``; each prompt a conversation: the system prompt (reasoning-gym's default unless given),
    then the question."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    name, options = parse_spec(spec)
    if name not in DATASETS:
        close = sorted(n for n in DATASETS if name[:4] in n)[:8] or sorted(DATASETS)[:8]
        raise DatasetError(f"--dataset-path {PREFIX}{name}: no such reasoning-gym dataset (e.g. {', '.join(close)})")
    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
        entries = [data[i] for i in range(size)]
    except Exception as err:  # a generator's own validation
        raise DatasetError(f"--dataset-path {PREFIX}{spec}: reasoning-gym cannot generate it: {err}") from None
    system = default_system_prompt() if system_prompt is None else system_prompt
    return [{"prompt": [{"role": "system", "content": system}, {"role": "user", "content": entry["question"]}],
             "answer": str(entry["answer"]), "gym_entry": json.dumps(entry, default=str)}
            for entry in entries]


def default_system_prompt() -> str:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS["default"]


def reasoning_gym(completions: Sequence[Any], gym_entry: Sequence[str], **kwargs: Any) -> list[float]:
    """reasoning-gym's own score in [0, 1] of the ``<answer>`` of each completion."""
    import reasoning_gym as rg
    from reasoning_gym.utils import extract_answer

    scores = []
    for completion, raw in zip(completions, gym_entry):
        entry = json.loads(raw)
        score = rg.get_score_answer_fn(entry["metadata"]["source_dataset"])
        answer = extract_answer(completion_text(completion))
        scores.append(float(score(answer, entry)) if answer is not None else 0.0)
    return scores
