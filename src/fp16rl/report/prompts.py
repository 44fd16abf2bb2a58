"""The per-prompt paired comparison: both arms of a seed see the same prompts at the same step with the
same random numbers, so a prompt's reward in one arm can be set against its reward in the other.

The trainer writes a step's scored completions to ``samples/step-NNNNNN.jsonl`` (one JSON object per
completion with ``uid`` and ``reward``; every ``save_samples_steps`` steps and at step 1). A prompt's
reward is the mean over its completions there; the difference is taken for every (seed, step, uid)
both arms recorded, then averaged over the seeds that share a (step, uid).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fp16rl.core.errors import ReportError
from fp16rl.report.inference import sign_test_p
from fp16rl.report.load import as_float

SAMPLE_FILE = re.compile(r"step-(\d+)\.jsonl")
TIE = 1e-9  # |difference| at or below this counts as a tie (means of the same scores agree to rounding)

PromptKey = tuple[int, str]  # (step, prompt uid)


@dataclass
class PromptComparison:
    """``arm`` minus ``reference``, prompt by prompt (a prompt = one (step, uid) in samples/)."""

    prompts: int
    seeds: list[int]
    steps: int
    reference_mean: float
    arm_mean: float
    diff_mean: float
    better: int
    worse: int
    tied: int
    sign_test_p: float  # exact binomial, ties dropped; treats prompts as independent


def read_prompt_rewards(run_dir: Path) -> dict[PromptKey, float]:
    """Mean reward per (step, uid) from a run's samples/ (empty when it has none).

    A malformed line is an error naming the file and line; a completion whose reward is missing or
    not finite is left out of its prompt's mean (a prompt with none left is left out).
    """
    scores: dict[PromptKey, list[float]] = defaultdict(list)
    folder = run_dir / "samples"
    files = sorted(folder.glob("step-*.jsonl")) if folder.is_dir() else []
    for path in files:
        match = SAMPLE_FILE.fullmatch(path.name)
        if match is None:
            continue
        step = int(match.group(1))
        for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "uid" not in record:
                raise ReportError(f"{path}, line {number}: a sample record needs a 'uid' field")
            reward = as_float(record.get("reward"))
            if math.isfinite(reward):
                scores[step, str(record["uid"])].append(reward)
    return {key: float(np.mean(values)) for key, values in scores.items()}


def compare_prompts(reference: dict[int, dict[PromptKey, float]],
                    arm: dict[int, dict[PromptKey, float]]) -> PromptComparison | None:
    """The per-prompt comparison over the seeds both mappings hold ({seed: {(step, uid): reward}});
    None when no (seed, step, uid) was recorded by both arms."""
    by_prompt: dict[PromptKey, list[tuple[float, float]]] = defaultdict(list)
    seeds = []
    for seed in sorted(set(reference) & set(arm)):
        shared = set(reference[seed]) & set(arm[seed])
        if shared:
            seeds.append(seed)
        for key in sorted(shared):  # a fixed order: the means' float sums must not depend on string hashing
            by_prompt[key].append((reference[seed][key], arm[seed][key]))
    if not by_prompt:
        return None
    pairs = np.array([np.mean(values, axis=0) for values in by_prompt.values()])  # (prompts, 2): ref, arm
    diffs = pairs[:, 1] - pairs[:, 0]
    better, worse = int(np.sum(diffs > TIE)), int(np.sum(diffs < -TIE))
    return PromptComparison(
        prompts=len(diffs), seeds=seeds, steps=len({step for step, _ in by_prompt}),
        reference_mean=float(pairs[:, 0].mean()), arm_mean=float(pairs[:, 1].mean()), diff_mean=float(diffs.mean()),
        better=better, worse=worse, tied=len(diffs) - better - worse, sign_test_p=sign_test_p(better, worse),
    )
