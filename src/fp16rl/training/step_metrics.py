"""The per-step metrics every algorithm logs beside its own (``Trainer.step``'s phase 5): outcomes, the
policy's entropy, the optimizer's, and the step's times and throughputs (docs/design.md, "Other per-step
metrics")."""

from __future__ import annotations

import time

from fp16rl.learner.distributed import DataParallel, WholeBatch
from fp16rl.measure.rollouts import Measurement
from fp16rl.training.outcomes import outcome_metrics


def step_metrics(whole: WholeBatch, measured: Measurement, optim_metrics: dict[str, float], times: dict[str, float],
                 passes: int, parallel: DataParallel) -> dict[str, float]:
    """The outcome, entropy, optimizer, time and throughput metrics of a step; ``times``: its
    ``perf_counter`` marks and the reward's and telemetry's seconds; ``passes``: optimizer passes per batch."""
    num_tokens = float(whole.completion_mask.sum())
    train_s = measured.recompute_s + times["trained"] - times["scored"]
    return {
        **outcome_metrics(whole.scores, whole.completion_mask, whole.truncated, whole.token_lists),
        "policy/entropy": (whole.entropy * whole.completion_mask).sum().item() / max(num_tokens, 1.0),
        **measured.vocab_metrics(parallel),
        **optim_metrics,
        "time/rollout_s": measured.sample_s,
        "time/reward_s": times["reward_s"],
        "time/train_s": train_s,
        # The telemetry's cost: the metrics, and where the loss cannot give pi_old (``pi_old.py``),
        # its no-grad recompute on the sampled tokens.
        "time/mismatch_s": times["mismatch_s"],
        "time/step_s": time.perf_counter() - times["t0"],
        "throughput/rollout_tokens_per_s": num_tokens / max(measured.sample_s, 1e-9),
        "throughput/train_tokens_per_s": num_tokens * passes / max(train_s, 1e-9),
    }
