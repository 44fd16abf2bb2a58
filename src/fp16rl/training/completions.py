"""The completions table of a logged step (``--save-samples-steps``, and step 1): one record per completion
of the generation batch in ``samples/step-NNNNNN.jsonl``, and the same table to the ``--report-to``
trackers (``trackers.py``), as TRL's ``log_completions`` shows it.

A record holds ``uid`` (its prompt's id: the report pairs arms prompt by prompt on it), ``prompt`` (as the
sampler saw it, chat template applied), ``completion``, ``rewards`` (``{function: score}``, None where the
function returned None or NaN), ``reward`` (the combined reward the step trained on), ``advantage`` (the
algorithm's, ``Algorithm.sample_advantages``: GRPO's group advantage, PPO's mean over the completion's
loss tokens, None for online DPO, which has none), ``finish_reason``, and ``details`` when the task or a
reward function's ``log_extra`` gave any (ARC's ``copying`` and ``copy_evidence``, for one).

With several ranks every rank's completions are gathered, in rank order, so the records are the whole
batch's as one process would write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from fp16rl.core.scores import Scores
from fp16rl.learner.distributed import DataParallel
from fp16rl.tasks.base import PromptItem

TABLE_KEYS = ("step", "prompt", "completion", "advantage")  # TRL's fixed columns (a function's name goes between)


@dataclass(frozen=True)
class CompletionRows:
    """This rank's completions of a logged step, aligned row by row (one item per completion)."""

    items: Sequence[PromptItem]
    completions: Sequence[str]
    finish_reasons: Sequence[str]
    scores: Scores
    advantages: Sequence[float | None] | None  # None: the algorithm has no per-completion advantage


def _finite(value: float | None) -> float | None:
    """A score or advantage as JSON holds it: None for "none" (NaN, a function's not-applicable)."""
    return None if value is None or not math.isfinite(value) else float(value)


def completion_records(rows: CompletionRows) -> list[dict[str, Any]]:
    """One ``samples/`` record per completion of ``rows`` (the module docstring lists the fields)."""
    scores = rows.scores
    return [
        {
            "uid": rows.items[i].uid,
            "prompt": rows.items[i].text,
            "completion": rows.completions[i],
            "rewards": {name: _finite(values[i]) for name, values in scores.components.items()},
            "reward": scores.rewards[i],
            "advantage": None if rows.advantages is None else _finite(rows.advantages[i]),
            "finish_reason": rows.finish_reasons[i],
            **({"details": scores.details[i]} if scores.details else {}),
        }
        for i in range(len(rows.completions))
    ]


def gathered_records(parallel: DataParallel, rows: CompletionRows) -> list[dict[str, Any]]:
    """Every rank's records of the step, in rank order (a collective: every rank calls it at a logged step)."""
    return [record for part in parallel.gather_objects(completion_records(rows)) for record in part]


def completions_table(step: int, records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The trackers' table of a step's records: TRL's columns ``step, prompt, completion``, one per reward
    function (its score), the details' scalar fields (a reward's ``log_extra`` columns, the task's own;
    nested ones stay in samples/ only, a table cell holds text or a number), then ``advantage``."""
    functions = list(dict.fromkeys(name for record in records for name in record["rewards"]))
    scalar = (str, int, float, bool, type(None))
    extra = [key for key in dict.fromkeys(k for record in records for k in record.get("details", {}))
             if key not in TABLE_KEYS and key not in functions
             and all(isinstance(record.get("details", {}).get(key), scalar) for record in records)]
    columns = ["step", "prompt", "completion", *functions, *extra, "advantage"]
    data = [[step, record["prompt"], record["completion"], *(record["rewards"].get(f) for f in functions),
             *(record.get("details", {}).get(key) for key in extra), record["advantage"]]
            for record in records]
    return columns, data


def markdown_table(columns: Sequence[str], data: Sequence[Sequence[Any]]) -> str:
    """The table as Markdown (TensorBoard's text panel): numbers to 4 significant digits, None empty, a
    cell's ``|`` escaped and its line breaks as ``<br>`` so that each row stays one line."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        text = format(value, ".4g") if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)
