"""PPO's part of the step (``--algorithm ppo``): the critic (``fp16rl.learner.critic``) built beside the
policy, its values ``V_old`` of the whole batch, token-level rewards with the KL penalty, GAE and whitened
advantages, then per part the clipped policy loss and the critic's clipped value loss, backpropagated one
after the other (``fp16rl.algo.ppo`` has the formulas, ``critic.py`` why two backwards). One rank: this
rank's batch is the whole batch."""

from __future__ import annotations

import torch

from fp16rl.algo.batch import RolloutBatch
from fp16rl.algo.ppo import ppo_advantages, ppo_policy_loss, ppo_value_loss
from fp16rl.config.options import TrainConfig
from fp16rl.learner.critic import Critic, copy_backbone
from fp16rl.training.algorithm import Algorithm, LossContext, LossNorm, StepRows, loss_settings


class Ppo(Algorithm):
    """``--ppo-epochs`` passes over each generation batch, the critic trained in the same optimizer steps."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.passes = config.ppo_epochs
        self.recomputes_pi_old = True  # the rewards' KL penalty and GAE read pi_old before the loss
        self.settings = loss_settings(config)
        self._backbone: torch.nn.Module | None = None

    def before_cast(self, model: torch.nn.Module, adapters: bool) -> None:
        """Full fine-tuning: the critic's decoder stack is a copy of the policy's, taken in FP32."""
        self._backbone = None if adapters else copy_backbone(model)

    def attach(self, context: LossContext) -> None:
        """The critic, after the sampler copied the policy (with LoRA it adds an adapter to the policy)."""
        super().attach(context)
        self.critic = Critic(context.model, self._backbone, context.policy, context.device)
        self._backbone = None  # the critic's now

    def loss_batch(self, rows: StepRows, metrics: dict[str, float]) -> RolloutBatch:
        cfg, context, tokens, loss_mask = self.config, self.context, rows.tokens, rows.loss_mask
        ref = context.reference_logprobs(tokens)
        values = self.critic.rollout_values(tokens, context.policy, context.rows)
        advantages, returns, value_metrics = ppo_advantages(rows.whole.rewards.to(context.device), loss_mask,
                                                            tokens.completion_mask, rows.old_logprobs, ref, values,
                                                            cfg.beta, cfg.gamma, cfg.lam)
        metrics.update(value_metrics)
        return RolloutBatch(tokens=tokens, advantages=advantages, loss_mask=loss_mask, old_logprobs=rows.old_logprobs,
                            sampler_logprobs=rows.sampler_logprobs, is_weights=rows.is_weights[:, :loss_mask.shape[1]],
                            old_values=values, returns=returns)

    def backward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, part: RolloutBatch, norm: LossNorm,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy loss's backward, then the critic's forward and the backward of ``vf_coef *`` its value
        loss under the critic's adapter; returns the summed loss's value and both losses' statistics."""
        cfg = self.config
        loss, stats = ppo_policy_loss(logprobs, old_logprobs, part, self.settings, norm.accumulation,
                                      norm.batch_tokens, norm.group)
        scaler.scale(loss).backward()
        with self.critic.active():
            with self.context.policy.autocast(self.context.device.type):
                values = self.critic.module(part.tokens)
            value_loss, value_stats = ppo_value_loss(values, part, cfg.cliprange_value, cfg.vf_coef,
                                                     norm.accumulation, norm.batch_tokens, norm.group)
            scaler.scale(value_loss).backward()
        return loss.detach() + value_loss.detach(), {**stats, **value_stats}

    def sample_advantages(self, batch: RolloutBatch) -> list[float] | None:
        """PPO's advantages are per token: a completion's is their mean over its loss tokens,
        ``sum_t m_t A_t / sum_t m_t`` (whitened, as the loss reads them); NaN when none is in the loss."""
        mask = batch.loss_mask.to(batch.advantages.dtype)
        counts = mask.sum(dim=1)
        means = (batch.advantages * mask).sum(dim=1) / counts.clamp(min=1)
        return [m if c > 0 else float("nan") for m, c in zip(means.tolist(), counts.tolist())]

    def summary(self, totals: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
        """``value/loss`` and ``value/clip_fraction``: means over the optimizer passes."""
        return {"value/loss": totals.get("value_loss", 0.0) / self.passes,
                "value/clip_fraction": totals.get("value_clip_fraction", 0.0) / self.passes}
