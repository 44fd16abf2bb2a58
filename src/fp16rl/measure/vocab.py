"""Full-vocabulary parity: the sampler's and the trainer's whole next-token distributions compared at a
bounded sample of completion positions (``--vocab-parity-positions``, docs/design.md "Full-vocabulary
parity").

The sampler keeps its ``log_softmax(logits / T)`` rows at the sampled positions while decoding
(``rollout/vocab_rows.py`` says which positions); the trainer's rows at the same positions come from the
last hidden states of a forward it makes anyway (the pi_old recompute, or the training forward when
pi_old comes from it: ``pi_old.py``), through its own head in its own compute context: ``tap`` reads
``k`` positions out of ``completion_logprobs``'s hidden states, so the cost is one ``[k, H] x [H, V]``
head product and the float64 divergences of ``k`` rows, not another forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from fp16rl.algo.mismatch import vocab_divergences, vocab_metrics
from fp16rl.learner.distributed import DataParallel
from fp16rl.learner.logprobs import LogitHead
from fp16rl.rollout.vocab_rows import EMPTY, VocabRows


@dataclass
class PositionStats:
    """Per compared position: ``priority`` (int64, the sample's order), ``column`` (t, the position in its
    completion), ``kl`` and ``tv`` (float64, ``vocab_divergences``), ``token_mu`` (float64, the sampler's
    probability of the token it drew there)."""

    priority: torch.Tensor
    column: torch.Tensor
    kl: torch.Tensor
    tv: torch.Tensor
    token_mu: torch.Tensor

    def select(self, index: torch.Tensor) -> "PositionStats":
        return PositionStats(self.priority[index], self.column[index], self.kl[index], self.tv[index],
                             self.token_mu[index])


@dataclass
class VocabParity:
    """The sampler's rows of one measurement (``sampler``, this rank's rows, on the trainer's device) and
    the trainer's rows at the same positions, filled by ``tap`` during a trainer forward over the same
    tokens (``completion_ids``) at the same weights. ``head``, ``temperature``: the trainer's, so both
    sides are ``log_softmax(logits / T)`` of the unprocessed distribution."""

    sampler: VocabRows
    head: LogitHead
    temperature: float
    completion_ids: torch.Tensor  # [n, C] this rank's sampled tokens
    trainer: torch.Tensor = field(init=False)
    taken: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.trainer = torch.zeros_like(self.sampler.logprobs)
        self.taken = torch.zeros(len(self.sampler), dtype=torch.bool, device=self.sampler.logprobs.device)

    def tap(self, begin: int) -> Callable[[torch.Tensor], None]:
        """A ``completion_logprobs`` tap for a forward over rows ``begin..`` of the measurement: the head
        on the hidden states of the sampled positions among them, in the caller's compute context."""

        def take(hidden: torch.Tensor) -> None:
            rows, columns = self.sampler.rows, self.sampler.columns
            inside = (rows >= begin) & (rows < begin + hidden.shape[0]) & (columns < hidden.shape[1])
            index = inside.nonzero().squeeze(1)
            if index.numel() == 0:
                return
            with torch.no_grad():
                logits = self.head(hidden.detach()[rows[index] - begin, columns[index]]).float()
                if self.temperature != 1.0:
                    logits = logits / self.temperature
                self.trainer[index] = torch.log_softmax(logits, dim=-1)
            self.taken[index] = True

        return take

    def positions(self) -> PositionStats:
        """This rank's compared positions; every sampled position must have been seen by a forward."""
        if not bool(self.taken.all()):
            raise RuntimeError("full-vocabulary parity: the trainer's forward did not cover every sampled position")
        kl, tv = vocab_divergences(self.sampler.logprobs, self.trainer)
        rows, columns = self.sampler.rows, self.sampler.columns
        tokens = self.completion_ids[rows, columns]
        token_mu = self.sampler.logprobs.gather(1, tokens[:, None]).squeeze(1).double().exp()
        return PositionStats(self.sampler.priority, columns, kl, tv, token_mu)


def whole_positions(parity: VocabParity, parallel: DataParallel) -> PositionStats:
    """Every rank's positions, reduced to the ``limit`` of smallest priority: the sample one process
    would have taken (the bottom-k of a union is the bottom-k of the parts' bottom-k)."""
    local = parity.positions()
    if not parallel.enabled:
        return local
    limit, count = parity.sampler.limit, len(local.priority)

    def padded(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        return torch.nn.functional.pad(values, (0, limit - count), value=fill)

    gathered = PositionStats(parallel.gather_rows(padded(local.priority, EMPTY)),
                             parallel.gather_rows(padded(local.column, 0)), parallel.gather_rows(padded(local.kl, 0.0)),
                             parallel.gather_rows(padded(local.tv, 0.0)), parallel.gather_rows(padded(local.token_mu, 0.0)))
    order = torch.argsort(gathered.priority)[:limit]
    return gathered.select(order[gathered.priority[order] != EMPTY])


def vocab_parity_metrics(parity: VocabParity | None, parallel: DataParallel) -> dict[str, float]:
    """The step's ``mismatch/vocab_*`` metrics (``algo.mismatch.vocab_metrics``) over the whole batch's
    sample of positions; none when the parity is off (``--vocab-parity-positions 0``)."""
    if parity is None:
        return {}
    stats = whole_positions(parity, parallel)
    return vocab_metrics(stats.kl, stats.tv)


# The probe's strata (``vocab_strata``): where in the completion, and how sure the sampler was of its token.
POSITION_BUCKETS = ((0, 1, "t=0"), (1, 4, "t=1-3"), (4, 16, "t=4-15"), (16, 64, "t=16-63"), (64, None, "t>=64"))
PROBABILITY_BUCKETS = ((0.0, 0.5, "mu<0.5"), (0.5, 0.9, "0.5<=mu<0.9"), (0.9, 0.99, "0.9<=mu<0.99"),
                       (0.99, None, "mu>=0.99"))


def vocab_strata(stats: PositionStats) -> dict[str, dict[str, dict[str, float]]]:
    """The full-vocabulary KL and TV (means) and the positions counted, stratified by position in the
    completion (``t``, 0-based: errors concentrate in the first tokens) and by the sampler's probability
    ``mu`` of the token it drew there; an empty stratum is left out."""

    def stratum(inside: torch.Tensor) -> dict[str, float] | None:
        if not bool(inside.any()):
            return None
        return {"positions": float(inside.sum()), "vocab_kl": stats.kl[inside].mean().item(),
                "vocab_kl_max": stats.kl[inside].max().item(), "vocab_tv": stats.tv[inside].mean().item()}

    def by(values: torch.Tensor, buckets: tuple) -> dict[str, dict[str, float]]:
        strata = {name: stratum((values >= low) & (values < (high if high is not None else math.inf)))
                  for low, high, name in buckets}
        return {name: value for name, value in strata.items() if value is not None}

    return {"by_position": by(stats.column.double(), POSITION_BUCKETS),
            "by_token_probability": by(stats.token_mu, PROBABILITY_BUCKETS)}


def concatenate(parts: list[PositionStats]) -> PositionStats:
    """Several measurements' positions as one set (the probe's chunks)."""
    return PositionStats(*(torch.cat([getattr(p, name) for p in parts]) for name in
                           ("priority", "column", "kl", "tv", "token_mu")))
