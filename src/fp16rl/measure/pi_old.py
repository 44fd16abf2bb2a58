"""pi_old, the trainer's logprobs of the sampled tokens at the weights that sampled them: what the
mismatch metrics compare mu with and what the IS correction divides by mu.

Two ways to get it, with the same numbers (tests/test_pi_old.py):

- a separate no-grad forward right after sampling (``rollouts.measure_rollouts``): needed whenever the
  loss uses pi_old before its own forward (several optimizer passes per batch, PPO, online DPO) and
  at the first step, whose forward also records the dtypes the trainer computed in;
- the training forward itself (``FromTrainingForward``): with one optimizer pass per batch (GRPO,
  ``num_iterations`` 1) the loss's forward runs at exactly those weights, so its detached logprobs
  *are* pi_old. Each part's IS weights follow from its pi_old before its loss, and the metrics are
  computed once every part is in, over the whole batch as before. This removes a forward of the whole
  batch from every step (the telemetry's main cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fp16rl.algo.grpo import Correction
from fp16rl.learner.distributed import WholeBatch
from fp16rl.algo.mismatch import mismatch_metrics, sampling_metrics
from fp16rl.measure.vocab import VocabParity


def is_denominator(is_reference: str, mu: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """What the IS correction divides pi_old by: mu (``--is-reference unprocessed``) or the logprobs of
    the distribution sampled after top-p/top-k/penalty (``behaviour``)."""
    return behaviour if is_reference == "behaviour" else mu


def telemetry(whole: WholeBatch, correction: Correction, is_reference: str) -> tuple[dict[str, float], torch.Tensor]:
    """The ``mismatch/*`` and ``sampling/*`` metrics of the whole batch and its IS weights ``[N, C]``
    (``w`` of ``Correction``, with ``rho = pi_old / mu``, or ``pi_old / behaviour`` with
    ``--is-reference behaviour``)."""
    metrics = mismatch_metrics(whole.sampler_logprobs, whole.old_logprobs, whole.completion_mask)
    metrics.update(sampling_metrics(whole.behaviour_logprobs, whole.kept_mass, whole.old_logprobs,
                                    whole.completion_mask))
    is_mu = is_denominator(is_reference, whole.sampler_logprobs, whole.behaviour_logprobs)
    is_weights, metrics["mismatch/is_masked_ratio"] = correction.weights(whole.old_logprobs, is_mu,
                                                                         whole.completion_mask)
    return metrics, is_weights


@dataclass
class FromTrainingForward:
    """Collects pi_old (and the entropy) of this rank's rows part by part from the training forward.

    ``is_mu``: the IS denominator of these rows (mu, or the behaviour logprobs); ``mask``: their
    completion mask, ``[n, C]`` like both. ``vocab``: the full-vocabulary parity of these rows, whose
    trainer side the same forward fills (``tap``).
    """

    correction: Correction
    is_mu: torch.Tensor
    mask: torch.Tensor
    vocab: VocabParity | None = None
    old: torch.Tensor = field(init=False)
    entropy: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.old = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device)
        self.entropy = torch.zeros_like(self.old)

    def take(self, rows: slice, logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Record the rows' pi_old (``logprobs`` detached) and entropy; return their IS weights."""
        self.old[rows] = logprobs.detach()
        self.entropy[rows] = entropy
        return self.correction.weights(self.old[rows], self.is_mu[rows], self.mask[rows])[0]

    def tap(self, begin: int) -> Callable[[torch.Tensor], None] | None:
        """The hidden-state tap of the training forward over rows ``begin..`` (None: no parity)."""
        return self.vocab.tap(begin) if self.vocab is not None else None

    def fill(self, old: torch.Tensor, entropy: torch.Tensor) -> None:
        """Every row at once (a step whose loss has no token runs no training forward: a recompute)."""
        self.old.copy_(old)
        self.entropy.copy_(entropy)
