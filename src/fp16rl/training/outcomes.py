"""What a step's completions achieved: the ``reward/*`` and ``completion/*`` metrics of one generation batch.

Computed from the whole batch's tensors and scores (gathered from every rank in data-parallel
training), so each value is the one-process value exactly, medians and maxima included.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fp16rl.core.scores import Scores


def reward_stats(scores: Scores) -> dict[str, float]:
    """``reward/<fn>/mean`` and ``reward/<fn>/std`` per reward component, over the completions it scored (a
    NaN value is a row the function returned None for; TRL's ``nanmean`` and ``nanstd``).

    mean = sum_i r_i / n; std = sqrt(sum_i (r_i - mean)^2 / (n - 1)), the sample std (Bessel's
    correction), as TRL's ``nanstd`` computes it. The mean is NaN when the function scored no completion,
    the std when it scored fewer than two (TRL's values too; metrics.jsonl writes null)."""
    stats = {}
    for name, values in scores.components.items():
        scored = [v for v in values if not math.isnan(v)]
        stats[f"reward/{name}/mean"] = float(np.mean(scored)) if scored else math.nan
        stats[f"reward/{name}/std"] = float(np.std(scored, ddof=1)) if len(scored) > 1 else math.nan
    return stats


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
        **reward_stats(scores),
        **scores.metrics,
        **scores.counts,
        "completion/length_mean": lengths.mean().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_ratio": float(np.mean(truncated)),
        "completion/unique_ngram_ratio_4": float(np.mean([unique_ngram_ratio(t) for t in token_lists])),
    }
