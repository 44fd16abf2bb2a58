"""What each algorithm's loss needs of a generation batch, built from the whole batch (every rank's
part, ``distributed.WholeBatch``) for this rank's rows: GRPO's group advantages and reference
logprobs; PPO's values, GAE advantages and returns (``ppo.py``); online DPO's pairs and per-row loss
weights (``dpo.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fp16rl.algo.grpo import group_advantages
from fp16rl.algo.batch import RolloutBatch
from fp16rl.learner.distributed import WholeBatch
from fp16rl.algo.dpo import DpoBatch, dpo_batch, select_pairs
from fp16rl.model.forward import TokenBatch
from fp16rl.algo.ppo import ppo_advantages

if TYPE_CHECKING:
    from fp16rl.train.trainer import Trainer


def loss_batch(trainer: Trainer, whole: WholeBatch, tokens: TokenBatch, old_logprobs: torch.Tensor | None,
               mu: torch.Tensor, is_weights: torch.Tensor | None, loss_mask: torch.Tensor,
               metrics: dict[str, float]) -> RolloutBatch:
    """This rank's rows as ``trainer``'s algorithm's loss needs them; its metrics go into ``metrics``.
    ``old_logprobs`` and ``is_weights`` are None where the loss's forward gives them (``pi_old.py``)."""
    cfg = trainer.config
    reference = trainer.reference
    if trainer.dpo:
        dpo = _dpo_batch(trainer, whole, tokens, old_logprobs, loss_mask)
        metrics.update(dpo.metrics)
        return dpo.batch
    if trainer.critic is not None:  # one rank: this batch is the whole batch
        ref = reference.logprobs(trainer, tokens) if reference else None
        values = trainer.critic.rollout_values(tokens, trainer.policy, trainer._forward_rows())
        advantages, returns, value_metrics = ppo_advantages(whole.rewards.to(trainer.device), loss_mask,
                                                            tokens.completion_mask, old_logprobs, ref, values,
                                                            cfg.beta, cfg.gamma, cfg.lam)
        metrics.update(value_metrics)
        return RolloutBatch(tokens=tokens, advantages=advantages, loss_mask=loss_mask, old_logprobs=old_logprobs,
                            sampler_logprobs=mu, is_weights=is_weights[:, :loss_mask.shape[1]],
                            old_values=values, returns=returns)
    advantages = group_advantages(whole.rewards, cfg.num_generations, cfg.scale_rewards)[whole.rows]
    return RolloutBatch(tokens=tokens, advantages=advantages.to(trainer.device), loss_mask=loss_mask,
                        old_logprobs=old_logprobs, sampler_logprobs=mu,
                        is_weights=None if is_weights is None else is_weights[whole.rows, :loss_mask.shape[1]],
                        ref_logprobs=reference.logprobs(trainer, tokens) if reference else None)


def _dpo_batch(trainer: Trainer, whole: WholeBatch, tokens: TokenBatch, old_logprobs: torch.Tensor,
               loss_mask: torch.Tensor) -> DpoBatch:
    """Online DPO's pairs of the whole batch (truncated completions are no candidates when masked) and
    this rank's rows of them, weighted by their share of the loss's gradient (``fp16rl.algo.dpo``)."""
    cfg, parallel = trainer.config, trainer.parallel
    candidates = whole.completion_mask.any(dim=1).tolist()
    if cfg.mask_truncated_completions:
        candidates = [c and not t for c, t in zip(candidates, whole.truncated)]
    rewards = whole.rewards.tolist()
    pairs = select_pairs(rewards, cfg.num_generations, candidates)
    return dpo_batch(pairs, whole.rows, tokens, old_logprobs, loss_mask, rewards,
                     lambda selected: trainer.reference.logprobs(trainer, selected), cfg.dpo_beta, cfg.dpo_loss_type,
                     parallel.sum, lambda rows: int(max(parallel.gather_objects(rows))))
