"""The optimizer passes over one generation batch (step 4 of ``Trainer.step``): GA micro-batches, each in
forwards of ``--per-device-train-batch-size`` completions whose losses the algorithm backpropagates
(``Algorithm.backward``), then the optimizer step in the trainer's precision (``scaled_optimizer_step``:
the fp16 loss scaler's unscale and skip, the gradient clip, the FP32 masters' update).

The loss is normalised by the counts of the whole generation batch and micro-batch (every rank's part:
``parallel.sum``), so the ranks' losses, and through DDP's sum their gradients, add up to the one-process
values.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fp16rl.algo.batch import RolloutBatch
from fp16rl.learner.distributed import DataParallel
from fp16rl.learner.fsdp import full_tensor
from fp16rl.learner.logprobs import completion_logprobs
from fp16rl.learner.weights import MasterWeights
from fp16rl.measure.pi_old import FromTrainingForward
from fp16rl.measure.rollouts import TrainerForward
from fp16rl.training.algorithm import Algorithm, LossNorm
from fp16rl.training.interrupt import StopRequest

logger = logging.getLogger("fp16rl")


@dataclass(frozen=True)
class BatchOptimizer:
    """What the passes over a generation batch use: the algorithm's loss, the policy's training forward
    (``forward``: its model, head, data-parallel wrapper and compute context), the GA micro-batch size on
    this rank, the loss scaler, and ``optimizer_step``, one (scaled) optimizer step returning ``(skipped,
    grad_norm)``. ``counters`` (the run's ``*_steps_total``) are updated in place. ``proximal``
    (``--decoupled-loss``): every pass's ratio is against ``batch.old_logprobs``, the proximal policy
    pi_theta(t-K) (``measure/staleness.py``), even in a single pass, whose ratio is otherwise exactly 1."""

    algorithm: Algorithm
    forward: TrainerForward
    parallel: DataParallel
    micro_batch: int
    accumulation: int
    sharded: bool
    scaler: torch.amp.GradScaler
    optimizer: torch.optim.Optimizer
    optimizer_step: Callable[[], tuple[int, float]]
    counters: dict[str, int]
    proximal: bool = False

    def run(self, batch: RolloutBatch, stop: StopRequest, step: int, metrics: dict[str, float],
            collected: FromTrainingForward | None = None) -> dict[str, float]:
        """``passes`` optimizer steps over ``batch``; returns the ``optim/*`` metrics (and the algorithm's).

        ``optim/lr`` is the learning rate these optimizer steps used; ``optim/grad_norm`` the mean of their
        gradient norms (``optim/grad_norm_max`` the largest). A step whose loss covers no token (every
        completion truncated and masked) changes nothing and is counted. ``collected`` takes pi_old from
        each part's forward and gives the part its IS weights; ``metrics``: the step's so far.
        """
        size = self.micro_batch
        starts = range(0, batch.advantages.shape[0], size)
        micro_tokens = self.parallel.sum([batch.loss_mask[b: b + size].sum().item() for b in starts])
        batch_tokens = int(sum(micro_tokens))
        result = {"optim/loss_tokens": float(batch_tokens), "optim/lr": self.optimizer.param_groups[0]["lr"]}
        if batch_tokens == 0:
            self._train_nothing(batch, step, collected)
            return {**result, **self._summary(0.0, [], [], 0, {}, batch.ref_logprobs is not None, metrics)}
        totals: dict[str, float] = {"loss": 0.0}
        skipped, norms, rates = 0, [], []
        for _ in range(self.algorithm.passes):
            self._backward_pass(batch, micro_tokens, batch_tokens, totals, stop, collected)
            stop.armed = False  # from here on the weights change: finish the step before stopping
            rates.append(self.optimizer.param_groups[0]["lr"])
            step_skipped, grad_norm = self.optimizer_step()
            skipped += step_skipped
            norms.append(grad_norm)
        self.counters["skipped_steps_total"] += skipped
        totals = dict(zip(totals, self.parallel.sum(list(totals.values()))))
        return {**result, **self._summary(totals["loss"] / self.algorithm.passes, norms, rates, skipped, totals,
                                          batch.ref_logprobs is not None, metrics)}

    def _train_nothing(self, batch: RolloutBatch, step: int, collected: FromTrainingForward | None) -> None:
        """A step without loss tokens: counted, warned about once; pi_old (if the forward was to give it)
        from a recompute, since no training forward runs."""
        self.counters["empty_loss_steps_total"] += 1
        if self.counters["empty_loss_steps_total"] == 1:
            logger.warning(self.algorithm.empty_loss_warning(step))
        if collected is not None:
            with torch.no_grad():
                collected.fill(*self.forward.logprobs(batch.tokens, with_entropy=True, vocab=collected.vocab))

    def _backward_pass(self, batch: RolloutBatch, micro_tokens: Sequence[float], batch_tokens: int,
                       totals: dict[str, float], stop: StopRequest, collected: FromTrainingForward | None) -> None:
        """One pass of forwards and backwards over the micro-batches; the losses' values and statistics are
        added to ``totals``. DDP reduces gradients in the pass's last backward only, FSDP in every one
        (its gradients accumulate as shards)."""
        size, rows, wrapped = self.micro_batch, self.forward.rows, self.forward.run_backbone
        total_rows = batch.advantages.shape[0]
        starts = range(0, total_rows, size)
        backwards = sum(math.ceil(min(size, total_rows - begin) / rows) for begin in starts)
        done = 0
        for begin, tokens in zip(starts, micro_tokens):
            micro = batch.select(slice(begin, begin + size))
            # A part of the micro-batch (several forwards, or a rank's share) is normalised as the whole.
            whole = rows >= size and not self.parallel.enabled
            norm = LossNorm(self.accumulation, batch_tokens,
                            None if whole else (size * self.parallel.world_size, int(tokens)))
            for part_begin in range(0, micro.advantages.shape[0], rows):
                part = micro.select(slice(part_begin, part_begin + rows))
                stop.check()  # a no-op once this step has changed the weights (stop.armed is False then)
                done += 1
                reduce = wrapped is None or self.sharded or done == backwards
                with contextlib.nullcontext() if reduce else wrapped.no_sync():
                    loss, stats = self._part_backward(part, begin + part_begin, norm, stop, collected)
                totals["loss"] += loss.item()
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value.item()

    def _part_backward(self, part: RolloutBatch, at: int, norm: LossNorm, stop: StopRequest,
                       collected: FromTrainingForward | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training forward of one part (rows ``at..`` of this rank's batch) and its loss's backward."""
        forward = self.forward
        with forward.policy.autocast(part.tokens.input_ids.device.type), stop.watching_layers(forward.model):
            logprobs, entropy = completion_logprobs(forward.model, part.tokens, forward.temperature,
                                                    collected is not None, forward.chunk_tokens, forward.head,
                                                    forward.run_backbone, forward.share_prompts,
                                                    collected.tap(at) if collected is not None else None)
        single = self.algorithm.passes == 1 and not self.proximal
        old = logprobs.detach() if single else part.old_logprobs  # one pass: ratio 1, as in TRL
        if collected is not None:
            part = replace(part, is_weights=collected.take(slice(at, at + part.advantages.shape[0]), logprobs,
                                                           entropy))
        return self.algorithm.backward(logprobs, old, part, norm, self.scaler)

    def _summary(self, loss: float, norms: list[float], rates: list[float], skipped: int, totals: dict[str, float],
                 with_reference: bool, metrics: dict[str, float]) -> dict[str, float]:
        """The ``optim/*`` and ``policy/*`` metrics of the passes (statistics: means over the passes), then
        the algorithm's."""
        passes = self.algorithm.passes
        summary = {
            "optim/loss": loss,
            "optim/grad_norm": float(np.mean(norms)) if norms else 0.0,
            "optim/grad_norm_max": float(np.max(norms)) if norms else 0.0,
            "optim/loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
            "optim/step_skipped": float(skipped),
            "optim/skipped_steps_total": float(self.counters["skipped_steps_total"]),
            "optim/empty_loss_steps_total": float(self.counters["empty_loss_steps_total"]),
            "policy/clip_ratio_low": totals.get("clip_ratio_low", 0.0) / passes,
            "policy/clip_ratio_high": totals.get("clip_ratio_high", 0.0) / passes,
        }
        if rates:
            summary["optim/lr"] = float(np.mean(rates))
        if with_reference:
            summary["policy/kl_ref"] = totals.get("kl_ref", 0.0) / passes
        summary.update(self.algorithm.summary(totals, metrics))
        return summary


def scaled_optimizer_step(trainables: Sequence[MasterWeights], optimizer: torch.optim.Optimizer, scheduler: Any,
                          scaler: torch.amp.GradScaler, max_grad_norm: float) -> tuple[int, float]:
    """Unscale, clip, step the FP32 masters, cast them into the models; returns ``(skipped, grad_norm)``.

    In fp16 the GradScaler finds inf/NaN, skips and lowers the scale; in bf16/fp32 a non-finite gradient
    norm skips the step the same way. Only a step taken advances the LR schedule. ``trainables``: the
    policy's weights, then the critic's (PPO: one norm over both).
    """
    for weights in trainables:
        weights.grads_to_masters()
    scaler.unscale_(optimizer)
    masters = [m for weights in trainables for m in weights.masters]
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(masters, max_grad_norm)))
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = int(scaler.get_scale() < scale_before)
    elif math.isfinite(grad_norm):
        optimizer.step()
        skipped = 0
    else:
        skipped = 1
    for weights in trainables:
        weights.zero_grad()
        if not skipped:
            weights.masters_to_model()
    if not skipped:
        scheduler.step()
    return skipped, grad_norm
