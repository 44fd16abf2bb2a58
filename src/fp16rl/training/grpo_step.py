"""GRPO's part of the step (``--algorithm grpo``, the default): group advantages of the whole batch, the
reference's logprobs for the KL penalty (beta != 0), the clipped surrogate of ``fp16rl.algo.grpo`` with
its loss types (bnpo, grpo, dr_grpo, dapo) and GSPO's sequence-level ratio."""

from __future__ import annotations

import torch

from fp16rl.algo.batch import RolloutBatch
from fp16rl.algo.grpo import group_advantages, policy_loss
from fp16rl.config.options import TrainConfig
from fp16rl.training.algorithm import Algorithm, LossNorm, StepRows, loss_settings


class Grpo(Algorithm):
    """``A_i = (R_i - mean_group R) / (std + 1e-4)`` per completion; ``--num-iterations`` passes."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.settings = loss_settings(config)

    def loss_batch(self, rows: StepRows, metrics: dict[str, float]) -> RolloutBatch:
        cfg, context, whole = self.config, self.context, rows.whole
        advantages = group_advantages(whole.rewards, cfg.num_generations, cfg.scale_rewards)[whole.rows]
        width = rows.loss_mask.shape[1]
        return RolloutBatch(tokens=rows.tokens, advantages=advantages.to(context.device), loss_mask=rows.loss_mask,
                            old_logprobs=rows.old_logprobs, sampler_logprobs=rows.sampler_logprobs,
                            is_weights=None if rows.is_weights is None else rows.is_weights[whole.rows, :width],
                            ref_logprobs=context.reference_logprobs(rows.tokens))

    def backward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, part: RolloutBatch, norm: LossNorm,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = policy_loss(logprobs, old_logprobs, part, self.settings, norm.accumulation, norm.batch_tokens,
                                  norm.group)
        scaler.scale(loss).backward()
        return loss, stats
