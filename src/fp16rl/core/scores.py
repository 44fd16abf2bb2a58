"""The rewards of a batch of completions: what a task returns and what the ranks gather."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Scores:
    """Rewards of a batch of completions, aligned with the completions passed in."""

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)  # -> reward/<fn>/mean (NaN: not scored)
    metrics: dict[str, float] = field(default_factory=dict)  # means over these completions, canonical names
    details: list[dict[str, Any]] = field(default_factory=list)  # per completion, for samples/
    counts: dict[str, float] = field(default_factory=dict)  # totals over these completions (they add up)

    @classmethod
    def merge(cls, parts: Sequence["Scores"]) -> "Scores":
        """The scores of a batch scored in parts (data-parallel ranks), exactly as if scored at once:
        lists concatenated, ``counts`` summed, each of ``metrics`` (a mean over its part's completions)
        weighted by its part's number of completions."""
        if len(parts) == 1:
            return parts[0]
        total = sum(len(p.rewards) for p in parts)
        keys = dict.fromkeys(k for p in parts for k in p.metrics)
        return cls(
            rewards=[r for p in parts for r in p.rewards],
            components={k: [v for p in parts for v in p.components.get(k, [])] for k in parts[0].components},
            metrics={k: sum(p.metrics[k] * len(p.rewards) for p in parts if k in p.metrics) / max(total, 1)
                     for k in keys},
            details=[d for p in parts for d in p.details],
            counts={k: sum(p.counts.get(k, 0.0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p.counts)},
        )
