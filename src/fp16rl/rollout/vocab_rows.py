"""The sampler's whole next-token distribution at a few completion positions (full-vocabulary parity).

The sampled-token metrics compare mu and pi at one token per position; the full-vocabulary ones
(``measure/vocab.py``) compare the whole distributions. Keeping a ``[V]`` row for every position would
cost ``tokens x V`` floats, so the decode loop keeps the rows of a bounded sample of positions as it
goes: exactly the ``log_softmax(logits / T)`` rows the sampler computed to record mu (the unprocessed,
temperature-scaled distribution: what the sampled-token metrics compare too).

Which positions (the rule): every completion token ``(row, t)`` has a 62-bit priority, a hash of the
row's key (``noise.row_keys``: a function of the step seed, the prompt's slot and ``g``) and of ``t``,
salted apart from the draw's noise. The sample is the ``limit`` decoded positions of smallest priority
(bottom-k sampling: uniform without replacement over the step's completion tokens). So the choice is a
pure function of (seed, step, slot, g, t) and of which positions exist: paired arms of a comparison
(same seed) measure the same positions wherever their completions cover them; it does not depend on
the batch split, the engine or the ranks, since the bottom-k of a union is the bottom-k of the parts'
bottom-k (``merge``; ``measure.vocab`` merges the ranks' the same way).

Cost: a hash of the active rows per step, one comparison with the current k-th priority and, for the
few positions that enter the sample, a copy of their row (``O(k log(tokens / k))`` copies a call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp16rl.rollout.noise import mix32

EMPTY = torch.iinfo(torch.int64).max  # the priority of a free slot: larger than any position's
_SALT = (0x2545F491, 0x6C8E9CF5)  # two salts: two independent 31-bit halves of the priority


def priorities(row_keys: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """The int64 priority of position(s) ``t`` of rows whose 32-bit keys are ``row_keys``:
    ``h_j = mix32(mix32(key ^ salt_j) ^ mix32(t))`` for two salts, ``(h_0 >> 1) << 31 | (h_1 >> 1)``.
    Different from the draw noise's ``mix32(key ^ mix32(t) ^ mix32(v))``, so the sample does not
    follow the drawn tokens. ``t`` an int: ``[rows]``; a ``[P]`` tensor of positions: ``[rows, P]``."""
    step_hash = mix32(t) if isinstance(t, int) else mix32(t.to(torch.int64))[None, :]
    keys = row_keys if isinstance(t, int) else row_keys[:, None]
    high = mix32(mix32(keys ^ _SALT[0]) ^ step_hash) >> 1
    low = mix32(mix32(keys ^ _SALT[1]) ^ step_hash) >> 1
    return (high << 31) | low


@dataclass
class VocabRows:
    """Kept positions and the sampler's log-distributions there: ``rows``, ``columns`` ``[k]`` long (the
    output row and completion position), ``priority`` ``[k]`` int64, ``logprobs`` ``[k, V]`` fp32
    (``log_softmax(logits / T)``); ``limit``: the sample size asked for (``k`` is smaller when the
    completions have fewer tokens)."""

    rows: torch.Tensor
    columns: torch.Tensor
    priority: torch.Tensor
    logprobs: torch.Tensor
    limit: int

    def __len__(self) -> int:
        return int(self.priority.shape[0])

    def select(self, index: torch.Tensor) -> "VocabRows":
        return VocabRows(self.rows[index], self.columns[index], self.priority[index], self.logprobs[index], self.limit)

    def to(self, device: torch.device) -> "VocabRows":
        return VocabRows(self.rows.to(device), self.columns.to(device), self.priority.to(device),
                         self.logprobs.to(device), self.limit)

    def clone(self) -> "VocabRows":
        """A copy outside inference mode (the trainer indexes with it later)."""
        return VocabRows(self.rows.clone(), self.columns.clone(), self.priority.clone(), self.logprobs.clone(),
                         self.limit)

    @staticmethod
    def merge(parts: list["VocabRows"], row_offsets: list[int]) -> "VocabRows":
        """The ``limit`` positions of smallest priority over several calls' samples, rows renumbered by
        each call's first output row (``row_offsets``), ordered by priority."""
        joined = VocabRows(torch.cat([p.rows + offset for p, offset in zip(parts, row_offsets)]),
                           torch.cat([p.columns for p in parts]), torch.cat([p.priority for p in parts]),
                           torch.cat([p.logprobs for p in parts]), parts[0].limit)
        order = torch.argsort(joined.priority)[:joined.limit]
        return joined.select(order)


class VocabKeeper:
    """Keeps the ``limit`` decoded positions of smallest priority of one decode call (``Sampler._decode``
    offers every step's rows). The priorities of every row are computed for ``BLOCK`` positions at once
    (as ``TokenNoise`` does its hashes): a decode step then indexes them, one operation instead of ~20."""

    BLOCK = 64

    def __init__(self, row_keys: torch.Tensor, limit: int, vocab: int, device: torch.device):
        self.keys = row_keys.to(device)
        self.limit = limit
        self.priority = torch.full((limit,), EMPTY, dtype=torch.int64, device=device)
        self.rows = torch.zeros(limit, dtype=torch.long, device=device)
        self.columns = torch.zeros(limit, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(limit, vocab, dtype=torch.float32, device=device)
        self.threshold = EMPTY  # the largest kept priority (EMPTY while a slot is free)
        self.block: tuple[int, torch.Tensor] | None = None  # (first position, [rows, BLOCK] priorities)

    def _priorities(self, t: int, rows: torch.Tensor | None) -> torch.Tensor:
        if self.block is None or not self.block[0] <= t < self.block[0] + self.BLOCK:
            positions = torch.arange(t, t + self.BLOCK, device=self.keys.device)
            self.block = (t, priorities(self.keys, positions))
        column = self.block[1][:, t - self.block[0]]
        return column if rows is None else column[rows]

    def offer(self, t: int, rows: torch.Tensor | None, logprobs: torch.Tensor) -> None:
        """Step ``t``'s log-distributions ``[R, V]`` of output rows ``rows`` (None: every row, in order):
        those whose priority beats the largest kept one replace it."""
        priority = self._priorities(t, rows)
        candidates = (priority < self.threshold).nonzero().squeeze(1)
        if candidates.numel() == 0:
            return
        out_rows = torch.arange(logprobs.shape[0], device=logprobs.device) if rows is None else rows
        pooled = torch.cat([self.priority, priority[candidates]])
        chosen = torch.topk(pooled, self.limit, largest=False).indices
        entering = chosen[chosen >= self.limit] - self.limit
        kept = torch.zeros(self.limit, dtype=torch.bool, device=pooled.device)
        kept[chosen[chosen < self.limit]] = True
        free = (~kept).nonzero().squeeze(1)  # as many as enter
        source = candidates[entering]
        self.priority[free] = priority[source]
        self.rows[free] = out_rows[source]
        self.columns[free] = t
        self.logprobs[free] = logprobs[source]
        self.threshold = int(self.priority.max())

    def result(self) -> VocabRows:
        """The kept positions, ordered by priority (free slots dropped)."""
        order = torch.argsort(self.priority)
        order = order[self.priority[order] != EMPTY]
        return VocabRows(self.rows[order], self.columns[order], self.priority[order], self.logprobs[order],
                         self.limit)
