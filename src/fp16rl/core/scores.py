"""The rewards of a batch of completions: what a task returns and what the ranks gather."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Scores:
    """Rewards of a batch of completions, aligned with the completions passed in."""

    rewards: list[float]
    # per reward function, a score per completion (NaN: not scored) -> reward/<fn>/mean|std, samples/
    components: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # means over these completions, canonical names
    details: list[dict[str, Any]] = field(default_factory=list)  # per completion, for samples/ (or none)
    counts: dict[str, float] = field(default_factory=dict)  # totals over these completions (they add up)
    # (sum, count) of the values behind a metric that is a mean over calls, not over completions: a reward
    # function's log_metric values, averaged as TRL averages them (sum / count over every call and rank)
    metric_sums: dict[str, tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence["Scores"]) -> "Scores":
        """The scores of a batch scored in parts (data-parallel ranks), exactly as if scored at once:
        lists concatenated (a part without details gets an empty dict per completion when another part has
        them, so they stay aligned), ``counts`` summed, each of ``metrics`` (a mean over its part's
        completions) weighted by its part's number of completions, except those in ``metric_sums``:
        ``sum of sums / sum of counts``."""
        if len(parts) == 1:
            return parts[0]
        total = sum(len(p.rewards) for p in parts)
        keys = dict.fromkeys(k for p in parts for k in p.metrics)
        sums = {k: (sum(p.metric_sums[k][0] for p in parts if k in p.metric_sums),
                    sum(p.metric_sums[k][1] for p in parts if k in p.metric_sums))
                for k in dict.fromkeys(k for p in parts for k in p.metric_sums)}
        metrics = {k: sum(p.metrics[k] * len(p.rewards) for p in parts if k in p.metrics) / max(total, 1) for k in keys}
        metrics.update({k: value / max(count, 1) for k, (value, count) in sums.items()})
        has_details = any(p.details for p in parts)
        return cls(
            rewards=[r for p in parts for r in p.rewards],
            components={k: [v for p in parts for v in p.components.get(k, [])] for k in parts[0].components},
            metrics=metrics,
            details=[d for p in parts for d in (p.details or [{} for _ in p.rewards])] if has_details else [],
            counts={k: sum(p.counts.get(k, 0.0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p.counts)},
            metric_sums=sums,
        )
