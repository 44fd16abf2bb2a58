"""GRPO-family advantages, importance-sampling corrections and the clipped surrogate loss.

Pure tensor functions: ``fp16rl.training.grpo_step`` wires them into the step. The loss-type normalisations
follow TRL's GRPOTrainer so results are comparable (the formulas are in each docstring); fp16rl's
*defaults* are the seed ARC script's (bnpo, as its TRL version had), not TRL's current ones (dapo).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from fp16rl.config.options import IS_CORRECTIONS, IS_LEVELS, LOSS_TYPES, SCALE_REWARDS
from fp16rl.algo.mismatch import MAX_LOG_RATIO

if TYPE_CHECKING:
    from fp16rl.algo.batch import RolloutBatch

_STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """``A_i = (R_i - mean_group R) / (std + 1e-4)``; std of the group, of the batch, or none (no division).

    Rows ``i*G .. i*G+G-1`` form group ``i``. Standard deviations are unbiased, as in TRL.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.float().view(-1, num_generations)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(centred)
    else:
        std = rewards.float().std() if rewards.numel() > 1 else torch.tensor(0.0)
    return centred / (std + _STD_EPS)


@dataclass(frozen=True)
class Correction:
    """IS correction of the sampler/trainer mismatch on ``rho = pi_old / mu``.

    token_*: ``rho_t = exp(lpi_old_t - lmu_t)`` per token; sequence_*: ``rho = exp(sum_t (lpi_old_t -
    lmu_t))`` for the whole completion. *_truncate: ``w = clamp(rho, clip_min, clip_max)`` (TIS);
    *_mask: ``w = rho`` where ``clip_min <= rho <= clip_max``, else 0 (the token or sequence is dropped).
    """

    mode: str = "none"
    clip_max: float = 2.0  # C: truncation cap, or upper bound of the kept band for *_mask
    clip_min: float = 0.0  # Cmin: lower bound of the kept band for *_mask

    def __post_init__(self) -> None:
        if self.mode not in IS_CORRECTIONS:
            raise ValueError(f"is_correction must be one of {IS_CORRECTIONS}, got {self.mode!r}")
        if self.clip_max <= 0 or self.clip_min < 0 or self.clip_min >= self.clip_max:
            raise ValueError("IS clip values need 0 <= is_clip_min < is_clip_max")

    def weights(
        self, old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Detached per-token weights ``[N, C]`` and the fraction of tokens a mask mode zeroed."""
        mask = mask.bool()
        if self.mode == "none":
            return torch.ones_like(old_logprobs), 0.0
        log_rho = ((old_logprobs - sampler_logprobs) * mask).detach().float()
        if self.mode.startswith("token"):
            rho = torch.exp(log_rho.clamp(max=MAX_LOG_RATIO))
        else:  # the full product of token ratios, not the length-normalised one (TRL #5814)
            rho = torch.exp(log_rho.sum(dim=1, keepdim=True).clamp(max=MAX_LOG_RATIO)).expand_as(log_rho)
        if self.mode.endswith("truncate"):  # TIS: clamp into [clip_min, clip_max], as TRL does
            return rho.clamp(min=self.clip_min, max=self.clip_max), 0.0
        keep = (rho >= self.clip_min) & (rho <= self.clip_max)
        masked_ratio = ((~keep) & mask).sum().item() / max(int(mask.sum()), 1)
        return rho * keep, masked_ratio


@dataclass(frozen=True)
class LossSettings:
    """Options of the clipped surrogate; ``TrainConfig`` documents and validates each one."""

    loss_type: str = "bnpo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon (symmetric); DAPO uses 0.28
    beta: float = 0.0
    max_completion_length: int = 256  # dr_grpo's constant normaliser

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def k3(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(q || p) on samples from q: ``exp(log_p - log_q) - (log_p - log_q) - 1``."""
    diff = log_p - log_q
    return torch.exp(diff) - diff - 1


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    batch: RolloutBatch,
    settings: LossSettings,
    grad_accum_steps: int = 1,
    batch_tokens: int | None = None,
    group: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, already scaled so summing micro-batches gives the step's loss.

    ``group = (rows, tokens)`` of the gradient-accumulation micro-batch when ``batch`` is only a part
    of it (``--per-device-train-batch-size``): the normalisers are the micro-batch's, so the parts' losses
    and statistics add up to the micro-batch's exactly, whatever the number of completions per forward.

    ``logprobs`` carry gradient (pi_theta); ``old_logprobs`` are pi_old (``batch.old_logprobs``, or
    ``logprobs.detach()`` when each batch gets one optimizer step); ``batch`` gives the advantages
    ``[N]``, the loss mask, the IS weights and the reference logprobs; ``batch_tokens`` is the number
    of loss tokens in the whole generation batch (dapo's normaliser, and the statistics': each is a
    fraction of the batch's loss tokens, so they add up over micro-batches and ranks).

    ``L_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) * w_t + beta * k3(ref_t, lpi_t)`` with
    ``r_t = exp(lpi_t - lpi_old_t)`` (GSPO: ``r = exp(mean_t(lpi_t - lpi_old_t))`` per row).
    """
    advantages, is_weights, ref_logprobs = batch.advantages, batch.is_weights, batch.ref_logprobs
    mask = batch.loss_mask.float()
    log_ratio = logprobs - old_logprobs
    if settings.importance_sampling_level == "sequence":  # GSPO: length-normalised sequence ratio
        log_ratio = ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - settings.epsilon, 1 + settings.eps_high)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl = None
    if settings.beta != 0.0 and ref_logprobs is not None:
        kl = k3(ref_logprobs, logprobs)
        per_token = per_token + settings.beta * kl

    loss = aggregate(per_token, mask, settings, grad_accum_steps, batch_tokens, group)
    with torch.no_grad():  # fractions of the generation batch's loss tokens: they add up over micro-batches
        ratio_full = ratio.expand_as(mask)
        tokens = batch_tokens or (mask.sum().clamp(min=1) if group is None else group[1]) * grad_accum_steps
        tokens = max(tokens, 1)
        stats = {
            "clip_ratio_low": (((ratio_full < 1 - settings.epsilon) & (adv < 0)).float() * mask).sum() / tokens,
            "clip_ratio_high": (((ratio_full > 1 + settings.eps_high) & (adv > 0)).float() * mask).sum() / tokens,
        }
        if kl is not None:
            stats["kl_ref"] = (kl * mask).sum() / tokens
    return loss, stats


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, settings: LossSettings, grad_accum_steps: int, batch_tokens: int | None,
    group: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reduce per-token losses as ``settings.loss_type`` says (TRL semantics), over micro-batch ``m``:

    grpo ``mean_rows(sum_t L / T_row) / GA``; bnpo ``sum L / T_m / GA``; dapo ``sum L / T_batch``;
    dr_grpo ``sum L / (rows_m * max_completion_length) / GA``. ``group`` = (rows_m, T_m) when the
    tensors are only part of ``m``.
    """
    masked = per_token * mask
    rows = per_token.shape[0] if group is None else group[0]
    if settings.loss_type == "grpo":
        row_means = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return (row_means.mean() if group is None else row_means.sum() / rows) / grad_accum_steps
    if settings.loss_type == "bnpo":
        tokens = mask.sum().clamp(min=1) if group is None else max(group[1], 1)
        return masked.sum() / tokens / grad_accum_steps
    if settings.loss_type == "dapo":
        total = batch_tokens if batch_tokens is not None else mask.sum().item() * grad_accum_steps
        return masked.sum() / max(total, 1)
    return masked.sum() / (rows * settings.max_completion_length) / grad_accum_steps
