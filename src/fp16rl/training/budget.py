"""A mismatch budget that gates: the largest sampler/trainer mismatch a run accepts (``--mismatch-budget``).

prime-rl refuses a model whose mismatch KL exceeds a level by hand; TRL and others warn at most, and a
resume can raise the mismatch unnoticed. Here the run checks it: ``--mismatch-budget VALUE`` bounds one
``mismatch/*`` metric (``--mismatch-budget-metric``, default ``mismatch/vocab_kl``, the exact KL(mu || pi)
of the full-vocabulary parity) on every step's measurement. In the synchronous loop every step's rollouts
are the first sampled after a weight sync (``Sampler.sync_from`` ends each step), so this is the check "at
step 1, after every weight sync and after a resume" (a resume's first step measures the weights it
loaded). With ``--max-staleness K`` a step measures the weights it sampled with (K steps old), each
version once it is used: the same check, K steps later.

Over budget, ``--mismatch-budget-action stop`` (the default) ends the run: the step's metrics are logged
(with ``mismatch/budget_exceeded`` 1), summary.json's status is ``stopped_on_mismatch_budget`` and
``MismatchBudgetExceeded`` (a ``UserError``: the CLI prints its one ``error:`` line and exits 2; the
Python API raises it) names the metric, its value and the budget. ``warn`` logs a warning line and goes
on. A NaN metric counts as over budget (an undefined mismatch is not within any bound).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

from fp16rl.config.options import TrainConfig
from fp16rl.core.errors import UserError
from fp16rl.runs.folders import BUDGET_STOPPED

logger = logging.getLogger("fp16rl")

STATUS = BUDGET_STOPPED  # summary.json's status of a run the budget stopped
EXCEEDED = "mismatch/budget_exceeded"  # 1.0 on a step over budget, else 0.0 (logged when a budget is set)


class MismatchBudgetExceeded(UserError):
    """The run's sampler/trainer mismatch exceeded ``--mismatch-budget`` (action stop)."""


class BudgetedRun(Protocol):
    """What the gate reads and sets of a run (``Trainer``): its options, its tracker (rank 0's; None on
    the others) and the status summary.json will record."""

    config: TrainConfig
    tracker: Any
    status: str


def enforce_budget(run: BudgetedRun, step: int, metrics: dict[str, float]) -> None:
    """The gate after each step (``Trainer.train``): ``check_budget``; over budget with action stop, the
    step's metrics are logged, the status set and ``MismatchBudgetExceeded`` raised (every rank computes
    the same whole-batch metrics, so every rank stops at the same step)."""
    over = check_budget(run.config, step, metrics)
    if over is None:
        return
    if run.tracker is not None:
        run.tracker.log(step, metrics)
    run.status = STATUS
    raise over


def check_budget(config: TrainConfig, step: int, metrics: dict[str, float]) -> MismatchBudgetExceeded | None:
    """Compare the step's ``metrics`` with the budget; record ``mismatch/budget_exceeded`` in them. Returns
    the error to raise once the step is logged (action stop, over budget), else None (a warning is logged
    when over budget with action warn). Without a budget: nothing recorded, None."""
    if config.mismatch_budget is None:
        return None
    name, budget = config.mismatch_budget_metric, config.mismatch_budget
    value = metrics.get(name)
    if value is None:  # e.g. a step whose completions hold no token: nothing was measured
        metrics[EXCEEDED] = 0.0
        return None
    over = not (math.isfinite(value) and value <= budget)
    metrics[EXCEEDED] = float(over)
    if not over:
        return None
    message = (f"precision mismatch over budget at step {step}: {name} = {value:.4g} > --mismatch-budget "
               f"{budget:g} (sampler {config.sampler_dtype or config.dtype}, trainer "
               f"{config.trainer_dtype or config.dtype})")
    if config.mismatch_budget_action == "warn":
        logger.warning(message + "; continuing (--mismatch-budget-action warn)")
        return None
    return MismatchBudgetExceeded(message + "; run stopped (status " + STATUS + ")")
