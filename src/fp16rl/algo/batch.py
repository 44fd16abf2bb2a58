"""What the losses take: the per-token tensors of one generation batch (``RolloutBatch``)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from fp16rl.model.forward import TokenBatch


@dataclass
class RolloutBatch:
    """The per-token tensors of one generation batch that the loss needs, ``[N, C]`` unless noted."""

    tokens: TokenBatch | None  # model inputs; None where only the loss is computed (formula tests)
    advantages: torch.Tensor  # [N] (PPO: [N, C], per token)
    loss_mask: torch.Tensor  # bool: completion tokens that count in the loss
    old_logprobs: torch.Tensor  # pi_old, fp32
    sampler_logprobs: torch.Tensor | None = None  # mu, fp32
    is_weights: torch.Tensor | None = None  # detached IS-correction weights (None = 1)
    ref_logprobs: torch.Tensor | None = None  # reference policy, for the KL penalty
    old_values: torch.Tensor | None = None  # PPO: the critic's values before the step, V_old
    returns: torch.Tensor | None = None  # PPO: GAE's returns, the value loss's targets

    def select(self, rows: slice | torch.Tensor) -> "RolloutBatch":
        return replace(self, **{f.name: _apply(getattr(self, f.name), lambda t: t.select(rows) if
                                               isinstance(t, TokenBatch) else t[rows]) for f in fields(self)})

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(self, **{f.name: _apply(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())



def _apply(value: Any, fn: Callable[[Any], Any]) -> Any:
    return None if value is None else fn(value)
