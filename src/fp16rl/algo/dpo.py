"""Online DPO (Guo et al. 2024, arXiv 2402.04792; TRL's OnlineDPOTrainer, Oat): pairs from the sampler's
own completions, ranked by the task's reward, trained with the DPO loss against the reference.

Per prompt the sampler draws G >= 2 completions as for GRPO; the completion with the highest reward is
*chosen*, the one with the lowest *rejected* (TRL draws exactly 2 and compares them; with G > 2 the
extremes give the clearest preference, as in Oat's best-of-n/worst-of-n pairing). A group whose highest
and lowest rewards tie says nothing about preference and is skipped (counted in ``dpo/tied_fraction``).
With ``--mask-truncated-completions`` a truncated completion is no candidate (its reward says nothing,
and its tokens are out of the loss); a group left with fewer than two is counted in
``dpo/unpaired_fraction``.

How the loss becomes gradients without holding a pair in one graph: with ``s = sum_t logpi_t`` the
sequence logprob of a row, the loss ``L = mean_pairs f(s_c, s_r)`` has the gradient
``sum_rows (dL/ds_row) grad s_row``. The coefficients ``w_row = dL/ds_row`` are computed once from the
trainer's logprobs pi_old, which ``measure_rollouts`` computed at these very weights in the same compute
path; each forward then backpropagates the linear surrogate ``sum_rows w_row s_row``. So any split of
the rows (gradient accumulation, ``--per-device-train-batch-size``, ranks) gives the same gradients,
and a completion's forward never waits for its partner's. This is why online DPO takes one optimizer
step per generation batch (``--num-iterations 1``, as TRL): after a step pi_old is no longer the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fp16rl.algo.batch import RolloutBatch
from fp16rl.config.options import DPO_LOSS_TYPES
from fp16rl.model.forward import TokenBatch


def dpo_losses(h: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair loss of the preference logit ``h = (logpi_c - logref_c) - (logpi_r - logref_r)``.

    sigmoid (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``;
    ipo (Azar et al. 2023): ``(h - 1 / (2 * beta))^2``.
    The logprobs are sums over a completion's loss tokens for both, as TRL's OnlineDPOTrainer computes
    them (its offline DPOTrainer averages them over the length for IPO; online DPO does not).
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


@dataclass(frozen=True)
class Pairs:
    """Chosen and rejected rows (indices into the generation batch) of the prompts that make a pair."""

    chosen: list[int]
    rejected: list[int]
    margins: list[float]  # each pair's reward difference, chosen - rejected (``dpo/scores_margin``)
    groups: int  # prompts in the batch
    tied: int  # groups whose candidates all have the same reward
    unpaired: int  # groups with fewer than two candidates (truncated completions masked out)


def select_pairs(rewards: Sequence[float], num_generations: int, candidates: Sequence[bool]) -> Pairs:
    """Per group of ``num_generations`` rows: chosen = highest reward, rejected = lowest, among the
    ``candidates``; the first such row on equal rewards (deterministic). Ties and short groups are skipped."""
    chosen, rejected, margins, tied, unpaired = [], [], [], 0, 0
    groups = len(rewards) // num_generations
    for g in range(groups):
        rows = [r for r in range(g * num_generations, (g + 1) * num_generations) if candidates[r]]
        if len(rows) < 2:
            unpaired += 1
            continue
        best = max(rows, key=lambda r: (rewards[r], -r))
        worst = min(rows, key=lambda r: (rewards[r], r))
        if rewards[best] == rewards[worst]:
            tied += 1
            continue
        chosen.append(best)
        rejected.append(worst)
        margins.append(rewards[best] - rewards[worst])
    return Pairs(chosen, rejected, margins, groups, tied, unpaired)


@dataclass(frozen=True)
class Collectives:
    """What a DPO batch needs of the data-parallel ranks. ``total``: element-wise sums over the ranks
    (``DataParallel.sum``); ``pad_to(n)``: the row count every rank must have, the ranks' largest, so that
    they run the same number of forwards and backwards. One process: the list itself, and ``n``."""

    total: Callable[[list[float]], list[float]]
    pad_to: Callable[[int], int]


@dataclass
class DpoBatch:
    """This rank's chosen and rejected rows as a ``RolloutBatch`` whose ``advantages`` hold each row's loss
    coefficient ``w_row = dL/ds_row`` (rows ``[c_1..c_P, r_1..r_P]``, then zero-weight padding), and the
    step's ``dpo/*`` metrics (of the whole batch, every rank's pairs)."""

    batch: RolloutBatch
    metrics: dict[str, float]
    pairs: int  # over all ranks


def dpo_batch(pairs: Pairs, rows: slice, tokens: TokenBatch, old_logprobs: torch.Tensor, loss_mask: torch.Tensor,
              reference: Callable[[TokenBatch], torch.Tensor], beta: float, loss_type: str,
              ranks: Collectives) -> DpoBatch:
    """Build this rank's part of the DPO step. ``rows``: this rank's rows of the generation batch (``pairs``
    index the whole batch; ``tokens``, ``old_logprobs`` and ``loss_mask`` are this rank's); ``reference(tokens)``:
    the reference's token logprobs (no grad)."""
    total = ranks.total
    mine = [(c - rows.start, r - rows.start, margin)
            for c, r, margin in zip(pairs.chosen, pairs.rejected, pairs.margins)
            if rows.start <= c < rows.stop]  # a group's rows are all on one rank
    count = len(mine)
    index = torch.tensor([c for c, _, _ in mine] + [r for _, r, _ in mine], dtype=torch.long,
                         device=old_logprobs.device)
    mask = loss_mask[index]
    selected = tokens.select(index)
    seq_pi = (old_logprobs[index] * mask).sum(dim=1)
    seq_ref = (reference(selected) * mask).sum(dim=1) if count else seq_pi.detach().clone()
    pairs_total = int(total([float(count)])[0])

    s = seq_pi.detach().clone().requires_grad_(True)
    h = (s[:count] - seq_ref[:count]) - (s[count:] - seq_ref[count:])
    losses = dpo_losses(h, beta, loss_type)
    weights = torch.autograd.grad(losses.sum() / max(pairs_total, 1), s)[0] if count else torch.zeros_like(s)
    with torch.no_grad():
        chosen_reward = beta * (s[:count] - seq_ref[:count])
        rejected_reward = beta * (s[count:] - seq_ref[count:])
        score_gap = sum(margin for _, _, margin in mine)
        sums = total([losses.sum().item(), chosen_reward.sum().item(), rejected_reward.sum().item(),
                      (h > 0).float().sum().item(), s[:count].sum().item(), s[count:].sum().item(), score_gap])
    mean = [v / max(pairs_total, 1) for v in sums]
    groups = max(pairs.groups, 1)
    metrics = {
        "dpo/loss": mean[0], "dpo/rewards_chosen": mean[1], "dpo/rewards_rejected": mean[2],
        "dpo/rewards_margins": mean[1] - mean[2], "dpo/rewards_accuracies": mean[3],
        "dpo/logps_chosen": mean[4], "dpo/logps_rejected": mean[5], "dpo/scores_margin": mean[6],
        "dpo/pairs": float(pairs_total), "dpo/tied_fraction": pairs.tied / groups,
        "dpo/unpaired_fraction": pairs.unpaired / groups,
    }
    target = ranks.pad_to(2 * count) if pairs_total else 0
    if target > 2 * count:  # zero-weight rows with no loss token: a rank with fewer pairs joins every backward
        extra = target - 2 * count
        index = torch.cat([index, torch.zeros(extra, dtype=torch.long, device=index.device)])
        mask = torch.cat([mask, torch.zeros_like(loss_mask[:1]).expand(extra, -1)])
        weights = torch.cat([weights, weights.new_zeros(extra)])
        selected = tokens.select(index)
    batch = RolloutBatch(tokens=selected, advantages=weights.detach(), loss_mask=mask, old_logprobs=old_logprobs[index])
    return DpoBatch(batch, metrics, pairs_total)


def dpo_part_loss(logprobs: torch.Tensor, part: RolloutBatch) -> torch.Tensor:
    """The surrogate one forward backpropagates: ``sum_rows w_row * sum_t m_t logpi_t`` (its gradient is
    the DPO loss's on these rows; its value is not the loss, which ``dpo/loss`` reports)."""
    return (part.advantages * (logprobs * part.loss_mask).sum(dim=1)).sum()
