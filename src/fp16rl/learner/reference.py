"""The reference policy of GRPO's KL penalty, PPO's KL reward penalty and online DPO."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from fp16rl.learner.logprobs import LogitHead
from fp16rl.model.forward import TokenBatch

LogprobsFn = Callable[[torch.nn.Module, TokenBatch, LogitHead | None], torch.Tensor]
"""``score(model, tokens, head)``: the trainer's token logprobs ``[N, C]`` of a batch under ``model``, in
the policy's compute path (micro-batches, compute context), with ``head`` (None: the policy's lm_head);
``Trainer.logprobs`` and ``measure.rollouts.TrainerForward.score``."""


class ReferencePolicy:
    """The reference of GRPO's KL penalty and PPO's KL reward penalty (when beta != 0) and of online DPO: the
    LoRA base with the adapters disabled, or, in full fine-tuning, a frozen copy of the initial policy that computes exactly
    as the policy did at step 1 (same stored dtypes, same compute context), so ``policy/kl_ref`` starts
    at 0 (and DPO's implicit rewards ``dpo/rewards_*`` too)."""

    def __init__(self, model: torch.nn.Module, adapters: bool, dtype: torch.dtype | None = None):
        """``dtype``: cast the copy's weights to it (under FSDP the policy's FP32 shards are gathered in the
        trainer dtype to compute, so the copy stores what the policy computes with)."""
        self.adapters = adapters
        self.model = model if adapters else copy.deepcopy(model).requires_grad_(False).eval()
        if dtype is not None and not adapters:
            for param in self.model.parameters():
                param.data = param.data.to(dtype)
        # The copy's own lm_head (the policy's trains, tied to the embeddings or not); with adapters the
        # policy's head is the base's.
        self.head = None if adapters else LogitHead.of(self.model)

    @torch.no_grad()
    def logprobs(self, score: LogprobsFn, tokens: TokenBatch) -> torch.Tensor:
        """The reference's token logprobs of ``tokens``, computed by ``score`` as the policy's are."""
        with self.model.disable_adapter() if self.adapters else contextlib.nullcontext():
            return score(self.model, tokens, self.head)
