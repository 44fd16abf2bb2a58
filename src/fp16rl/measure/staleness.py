"""The off-policy ratio of an asynchronous step split into its two causes (``--max-staleness K >= 1``).

Step t's tokens were sampled by the sampler at the weights of step t-K (``mu``, sampler dtype), and the
learner trains on them at the weights after step t-1. Per token, with ``lmu`` the sampler's logprob,
``lstale`` the trainer's at the weights that sampled (``pi_theta(t-K)``) and ``lpi_old`` the trainer's
at the current weights (``pi_theta(t-1)``, no grad: the IS correction's numerator):

    lpi_old - lmu  =  (lstale - lmu)        +  (lpi_old - lstale)
    full ratio        precision: mismatch/*     staleness: staleness/*

``mismatch/*`` (and ``sampling/*``) keep meaning precision alone: both engines at the same weights, as
with K = 0. ``staleness/*`` are the same formulas (``algo/mismatch.py`` ``mismatch_metrics``, renamed)
with ``lstale`` in the sampler's place and ``lpi_old`` in the trainer's: how far the policy moved
since it sampled, measured in one engine. Log-ratios add, so the k1 KLs, the sequence KLs and the
log IS ratios of the two parts sum to the full ratio's (``tests/test_async.py``).

The loss (``training/optimize.py``): the plain objective clips ``pi_theta / pi_old`` (the current
weights) and weights each token by ``--is-correction`` of the full ratio ``pi_old / mu``; with
``--decoupled-loss`` the ratio is clipped against the proximal policy ``pi_theta(t-K)`` and the IS
weight corrects ``pi_theta(t-K) / mu``, precision alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fp16rl.algo.grpo import Correction
from fp16rl.algo.mismatch import mismatch_metrics
from fp16rl.learner.distributed import WholeBatch
from fp16rl.measure.pi_old import FromTrainingForward, is_denominator, telemetry


def staleness_metrics(stale_logprobs: torch.Tensor, current_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, float]:
    """``staleness/*``: ``mismatch_metrics`` with the trainer at the sampling weights as the reference and
    the trainer at the current weights as the other side (``d_t = lpi_old_t - lstale_t``)."""
    return {"staleness/" + name.split("/", 1)[1]: value
            for name, value in mismatch_metrics(stale_logprobs, current_logprobs, mask).items()}


def split_telemetry(whole: WholeBatch, stale: torch.Tensor, correction: Correction, is_reference: str,
                    decoupled: bool) -> tuple[dict[str, float], torch.Tensor]:
    """The metrics of an asynchronous step and its IS weights ``[N, C]``: ``mismatch/*`` and ``sampling/*``
    of ``stale`` (the whole batch's trainer logprobs at the sampling weights) against mu, ``staleness/*``
    of ``whole.old_logprobs`` (current weights) against ``stale``. The IS weights and
    ``mismatch/is_masked_ratio`` are those of the correction the loss applies: on ``pi_old / mu`` (the
    full ratio), or with ``decoupled`` on ``pi_theta(t-K) / mu``."""
    metrics, precision_weights = telemetry(replace(whole, old_logprobs=stale), correction, is_reference)
    metrics.update(staleness_metrics(stale, whole.old_logprobs, whole.completion_mask))
    if decoupled:
        return metrics, precision_weights
    is_mu = is_denominator(is_reference, whole.sampler_logprobs, whole.behaviour_logprobs)
    weights, metrics["mismatch/is_masked_ratio"] = correction.weights(whole.old_logprobs, is_mu,
                                                                      whole.completion_mask)
    return metrics, weights


@dataclass
class FromStaleWeights(FromTrainingForward):
    """``FromTrainingForward`` for ``--decoupled-loss``: it still collects pi_old (the current weights)
    from the training forward, for ``staleness/*`` and the entropy, but each part's IS weights are the
    precision correction ``pi_theta(t-K) / mu``, known before the forward (``stale``: this rank's rows)."""

    stale: torch.Tensor | None = None

    def take(self, rows: slice, logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        super().take(rows, logprobs, entropy)
        return self.correction.weights(self.stale[rows], self.is_mu[rows], self.mask[rows])[0]


@dataclass(frozen=True)
class StepTelemetry:
    """How a step measures its rollouts and weights its tokens: the synchronous loop's (``stale`` None:
    ``telemetry``), or an asynchronous step's split (``stale``: the trainer's logprobs at the weights that
    sampled, this rank's rows; ``stale_whole``: every rank's)."""

    correction: Correction
    is_reference: str
    decoupled: bool = False
    stale: torch.Tensor | None = None
    stale_whole: torch.Tensor | None = None

    def measure(self, whole: WholeBatch) -> tuple[dict[str, float], torch.Tensor]:
        """The step's mismatch (and staleness) metrics and IS weights, ``whole.old_logprobs`` filled."""
        if self.stale_whole is None:
            return telemetry(whole, self.correction, self.is_reference)
        return split_telemetry(whole, self.stale_whole, self.correction, self.is_reference, self.decoupled)

    def loss_old(self, old_logprobs: torch.Tensor | None) -> torch.Tensor | None:
        """What the loss's ratio is against: pi_old, or with ``--decoupled-loss`` the proximal pi_theta(t-K)."""
        return self.stale if self.decoupled and self.stale is not None else old_logprobs

    def collector(self, is_mu: torch.Tensor, mask: torch.Tensor, **more: Any) -> FromTrainingForward:
        """The collector of pi_old from the training forward, giving each part its IS weights; ``more``:
        ``FromTrainingForward``'s other fields. An asynchronous step's full-vocabulary parity was taken at
        the sampling weights (precision), so the training forward at the current ones does not retake it."""
        if self.stale is not None:
            more.pop("vocab", None)
        if self.decoupled and self.stale is not None:
            return FromStaleWeights(self.correction, is_mu, mask, **more, stale=self.stale)
        return FromTrainingForward(self.correction, is_mu, mask, **more)
