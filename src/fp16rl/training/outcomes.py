"""What a step's completions achieved: the ``reward/*`` and ``completion/*`` metrics of one generation batch.

Computed from the whole batch's tensors and scores (gathered from every rank in data-parallel
training), so each value is the one-process value exactly, medians and maxima included.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fp16rl.tasks.base import PromptItem

from fp16rl.core.scores import Scores


def reward_means(scores: Scores) -> dict[str, float]:
    """``reward/<fn>/mean`` per reward component: the mean over the completions it scored (a NaN value
    is a row the function returned None for, TRL's ``nanmean``); NaN when it scored none."""
    means = {}
    for name, values in scores.components.items():
        scored = [v for v in values if not math.isnan(v)]
        means[f"reward/{name}/mean"] = float(np.mean(scored)) if scored else math.nan
    return means


def unique_ngram_ratio(tokens: Sequence[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a completion; falls as text starts looping (a collapse signal)."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def outcome_metrics(scores: Scores, completion_mask: torch.Tensor, truncated: Sequence[bool],
                    token_lists: Sequence[Sequence[int]]) -> dict[str, float]:
    """``reward/*`` (with the task's own metrics and counts) and ``completion/*`` of one generation batch."""
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)
    lengths = completion_mask.sum(dim=1).float()
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/min": rewards.min().item(),
        "reward/max": rewards.max().item(),
        **reward_means(scores),
        **scores.metrics,
        **scores.counts,
        "completion/length_mean": lengths.mean().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_ratio": float(np.mean(truncated)),
        "completion/unique_ngram_ratio_4": float(np.mean([unique_ngram_ratio(t) for t in token_lists])),
    }


def sample_records(items: Sequence[PromptItem], completions: Sequence[str], finish_reasons: Sequence[str],
                   scores: Scores, num_generations: int) -> list[dict]:
    """The first prompt's whole group (``samples/``): enough to read what the model writes and how it scored."""
    return [
        {
            "uid": items[i].uid,
            "prompt": items[i].text,
            "completion": completions[i],
            "reward": scores.rewards[i],
            "finish_reason": finish_reasons[i],
            **({"details": scores.details[i]} if scores.details else {}),
        }
        for i in range(min(num_generations, len(completions)))
    ]
