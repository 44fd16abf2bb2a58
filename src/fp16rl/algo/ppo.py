"""PPO with a critic (Schulman et al. 2017; the RLHF recipe of TRL's PPOTrainer, OpenRLHF and verl): token-level
rewards, GAE, advantage whitening, the clipped policy loss and the clipped value loss.

Pure tensor functions, as ``grpo.py`` is for GRPO; ``fp16rl.training.ppo_step`` wires them, ``critic.py`` holds the
value model. Tensors are ``[N, C]`` over the completion tokens (right-padded, ``mask`` marks real ones);
``V_t`` is the critic's value of the state *before* completion token ``t`` (the hidden state that predicts
``t``, the position whose logits give ``logpi_t``), as TRL's ``values[:, context_length - 1: -1]``.
The formulas follow TRL's ``PPOTrainer.train`` (its ppo_trainer.py) and verl's
``compute_gae_advantage_return`` / ``compute_value_loss`` (its core_algos.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fp16rl.algo.grpo import LossSettings, aggregate

if TYPE_CHECKING:
    from fp16rl.algo.batch import RolloutBatch

_WHITEN_EPS = 1e-8  # TRL's masked_whiten
# PPO's token mean over the whole generation batch: sum over a micro-batch's tokens / the batch's token count.
_WHOLE_BATCH_MEAN = LossSettings(loss_type="dapo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(x m) / sum(m)`` (0 when nothing is masked in)."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked-in entries, as TRL's ``masked_var``: ``mean((x - mean)^2) * n / (n - 1)``
    (0 with fewer than two entries, where TRL raises)."""
    n = mask.float().sum()
    if n < 2:
        return values.new_zeros(())
    centred = values - masked_mean(values, mask)
    return masked_mean(centred ** 2, mask) * n / (n - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked-in entries, 0 elsewhere (TRL's ``masked_whiten`` with
    ``shift_mean=True`` then ``masked_fill(padding, 0)``; verl's ``masked_whiten`` is the same)."""
    whitened = (values - masked_mean(values, mask)) * torch.rsqrt(masked_var(values, mask) + _WHITEN_EPS)
    return whitened * mask.float()


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor,
                  ref_logprobs: torch.Tensor | None, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t`` and the k1 KL estimate ``kl_t = logpi_old_t - logref_t``.

    ``r_t = -beta * kl_t + [t = last completion token] * score`` (TRL: ``non_score_reward = -kl_coef * kl``,
    the score added at the sequence's last token; without a reference or with beta = 0 only the score). A row
    without completion tokens gets no reward (it has no token to carry it).
    """
    mask = mask.bool()
    kl = (old_logprobs - ref_logprobs) * mask if ref_logprobs is not None else torch.zeros_like(old_logprobs)
    rewards = -beta * kl
    lengths = mask.long().sum(dim=1)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores.to(rewards.dtype)[rows]
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each row; returns ``(A, R)``, 0 where masked.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``R_t = A_t + V_t``, with
    ``V`` and ``A`` after the last completion token 0 (TRL's loop over ``reversed(range(gen_length))`` with
    ``nextvalues = 0`` at the end and the values of padding masked to 0; verl's ``compute_gae_advantage_return``).
    Right padding has ``r = V = 0``, so the last real token's next value is 0 as the formula needs.
    """
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / (Var(R) + 1e-5)`` over the masked-in tokens (1: the critic predicts the returns; 0: no
    better than their mean; negative: worse). The 1e-5 is verl's (``critic/vf_explained_var``): finite when
    every return is equal."""
    return (1 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-5)).item()


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, batch: RolloutBatch, settings: LossSettings,
                    grad_accum_steps: int, batch_tokens: int, group: tuple[int, int] | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with per-token advantages ``A_t`` (``batch.advantages`` ``[N, C]``, whitened):

    ``L_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps_high)) * w_t``, ``r_t = exp(logpi_t - logpi_old_t)``,
    ``w_t`` the IS correction's weight (1 without), averaged over the loss tokens (TRL:
    ``masked_mean(pg_loss_max, ~padding_mask)``). Each micro-batch or part contributes ``sum L / T_batch``
    (``aggregate``'s dapo: ``T_batch = batch_tokens``, the generation batch's loss tokens), so their sum is the
    batch's mean whatever the split: with ``sum L / T_m / GA`` (bnpo) micro-batches of unequal token counts
    ``T_m`` would weigh their tokens unequally and GA would change the step. ``group`` is unused (the
    normaliser is the batch's); the stats are fractions of ``batch_tokens``.
    """
    mask = batch.loss_mask.float()
    adv = batch.advantages
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - settings.epsilon, 1 + settings.eps_high)
    per_token = torch.max(-adv * ratio, -adv * clipped)
    if batch.is_weights is not None:
        per_token = per_token * batch.is_weights.detach()
    loss = aggregate(per_token, mask, _WHOLE_BATCH_MEAN, grad_accum_steps, batch_tokens, group)
    with torch.no_grad():
        tokens = max(batch_tokens, 1)
        stats = {
            "clip_ratio_low": (((ratio < 1 - settings.epsilon) & (adv < 0)).float() * mask).sum() / tokens,
            "clip_ratio_high": (((ratio > 1 + settings.eps_high) & (adv > 0)).float() * mask).sum() / tokens,
        }
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` and where the clipped term
    is the larger (TRL's ``vf_losses1/2``, ``vf_clipfrac``; verl's ``compute_value_loss``)."""
    clipped = torch.max(torch.min(values, old_values + cliprange), old_values - cliprange)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_sq, clipped_sq), clipped_sq > unclipped_sq


def ppo_value_loss(values: torch.Tensor, batch: RolloutBatch, cliprange: float, vf_coef: float,
                   grad_accum_steps: int, batch_tokens: int, group: tuple[int, int] | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``vf_coef *`` the clipped value loss averaged over the loss tokens (normalised as ``ppo_policy_loss``:
    ``sum / T_batch``), so that it adds to the policy loss as TRL's ``loss = pg_loss + vf_coef * vf_loss``.
    Stats: ``value_loss``, the value loss whose ``vf_coef`` multiple is backpropagated (the same sum over the
    same ``batch_tokens``, so the parts' stats add up to the batch's ``L^V``), and the clip fraction."""
    mask = batch.loss_mask.float()
    per_token, clipped = clipped_value_loss(values, batch.old_values, batch.returns, cliprange)
    value_loss = aggregate(per_token, mask, _WHOLE_BATCH_MEAN, grad_accum_steps, batch_tokens, group)
    with torch.no_grad():
        tokens = max(batch_tokens, 1)
        stats = {"value_loss": value_loss.detach(),
                 "value_clip_fraction": (clipped.float() * mask).sum() / tokens}
    return vf_coef * value_loss, stats


def ppo_advantages(scores: torch.Tensor, loss_mask: torch.Tensor, completion_mask: torch.Tensor,
                   old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, values: torch.Tensor, beta: float,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Whitened advantages and returns of a generation batch, and its ``value/*`` metrics before training.

    Rewards and GAE run over every completion token (a truncated completion masked out of the loss still has
    its tokens' values); whitening and the metrics use the loss tokens only, as TRL's ``~padding_mask``.
    """
    rewards, kl = token_rewards(scores, completion_mask, old_logprobs, ref_logprobs, beta)
    advantages, returns = gae(rewards, values, completion_mask, gamma, lam)
    metrics = {
        "value/mean": masked_mean(values, loss_mask).item(),
        "value/returns_mean": masked_mean(returns, loss_mask).item(),
        "value/advantages_mean": masked_mean(advantages, loss_mask).item(),
        "value/explained_variance": explained_variance(values, returns, loss_mask),
    }
    if ref_logprobs is not None:
        metrics["value/kl_penalty_mean"] = masked_mean(beta * kl, loss_mask).item()
    return masked_whiten(advantages, loss_mask), returns, metrics
