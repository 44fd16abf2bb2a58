"""Online DPO's part of the step (``--algorithm online_dpo``): the pairs of the whole batch (truncated
completions are no candidates when masked), this rank's rows of them weighted by their share of the
loss's gradient, and per part the linear surrogate whose gradient is the DPO loss's (``fp16rl.algo.dpo``
says why). The reference is always built; ``optim/loss`` reports the DPO loss itself."""

from __future__ import annotations

import torch

from fp16rl.algo.batch import RolloutBatch
from fp16rl.algo.dpo import Collectives, DpoBatch, dpo_batch, dpo_part_loss, select_pairs
from fp16rl.config.options import TrainConfig
from fp16rl.training.algorithm import Algorithm, LossNorm, StepRows


class OnlineDpo(Algorithm):
    """Chosen = the highest reward of a group, rejected = the lowest; one optimizer step per batch."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.recomputes_pi_old = True  # the rows' loss weights come from pi_old before any forward
        self.uses_reference = True

    def notes(self) -> list[str]:
        if self.config.is_correction == "none":
            return []
        return [f"--is-correction {self.config.is_correction} is ignored by --algorithm online_dpo "
                "(mismatch/is_masked_ratio still reports what it would mask)"]

    def loss_batch(self, rows: StepRows, metrics: dict[str, float]) -> RolloutBatch:
        dpo = self.pairs_batch(rows)
        metrics.update(dpo.metrics)
        return dpo.batch

    def pairs_batch(self, rows: StepRows) -> DpoBatch:
        """The pairs of the whole batch and this rank's rows of them, with the ``dpo/*`` metrics."""
        cfg, context, whole = self.config, self.context, rows.whole
        parallel = context.parallel
        candidates = whole.completion_mask.any(dim=1).tolist()
        if cfg.mask_truncated_completions:
            candidates = [c and not t for c, t in zip(candidates, whole.truncated)]
        pairs = select_pairs(whole.rewards.tolist(), cfg.num_generations, candidates)
        ranks = Collectives(parallel.sum, lambda count: int(max(parallel.gather_objects(count))))
        return dpo_batch(pairs, whole.rows, rows.tokens, rows.old_logprobs, rows.loss_mask,
                         context.reference_logprobs, cfg.dpo_beta, cfg.dpo_loss_type, ranks)

    def backward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, part: RolloutBatch, norm: LossNorm,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The surrogate ``sum_rows w_row * sum_t m_t logpi_t`` (its normalisation is in ``w_row``)."""
        loss = dpo_part_loss(logprobs, part)
        scaler.scale(loss).backward()
        return loss, {}

    def summary(self, totals: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
        """What was backpropagated has the DPO loss's gradient, not its value: ``optim/loss`` is ``dpo/loss``."""
        return {"optim/loss": metrics["dpo/loss"]}

    def sample_advantages(self, batch: RolloutBatch) -> list[float] | None:
        """None: online DPO has no advantage (its batch holds the chosen and rejected rows' loss weights)."""
        return None

    def empty_loss_warning(self, step: int) -> str:
        return (f"step {step}: no prompt gave a pair (every group's rewards tied, or fewer than two untruncated "
                "completions), so the step trained on nothing (counted in optim/empty_loss_steps_total; "
                "dpo/tied_fraction and dpo/unpaired_fraction say why)")
