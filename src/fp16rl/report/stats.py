"""The report's numbers, typed: per run, per arm, and each arm against the reference on paired seeds.

Every row is a dataclass (a mistyped field is an error, not a silent None); ``Analysis.to_json`` is
what report.json holds. The conclusion lines are built from these numbers only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from fp16rl.errors import ReportError
from fp16rl.report.load import Inputs, Run, as_float
from fp16rl.runs import DONE_STATUSES
from fp16rl.tracking import BEST_WINDOW, best_reward, final_reward

REWARD = "reward/mean"
LOGP_DIFF = "mismatch/logp_abs_diff_mean"
SEQ_KL = "mismatch/seq_kl"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

METHOD = [
    "Final reward: mean reward/mean over the last 10% of a run's logged steps (at least one); best reward: "
    f"best {BEST_WINDOW}-step moving average (the definitions of summary.json). Non-finite values are ignored.",
    "Median mismatch: median over a run's steps of mismatch/logp_abs_diff_mean (mean |log π - log μ| per token) "
    "and of mismatch/seq_kl; per arm, the median of its runs' medians.",
    "Per-arm numbers and the comparison use complete runs only (status finished or stopped_on_collapse); "
    "unfinished runs appear in the run table and the plots.",
    "Paired comparison: for each seed with a complete run in both arms (same prompts, augmentation and sampling "
    "seeds), the arm's final reward minus the reference's; the mean of these differences with a "
    f"{CONFIDENCE:.0%} percentile bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples of the per-seed differences, "
    f"numpy seed {BOOTSTRAP_SEED}). Mismatch: per-seed ratio arm/reference of the median |Δlogp|, geometric mean, "
    "interval from the same bootstrap on the log ratios. With one seed no interval can be computed; with few "
    "seeds (under ~5) the bootstrap interval is narrower than the truth, so read it as a rough guide.",
    "Collapses: the collapse detector of each run (summary.json collapse_step and rule), counted over complete runs.",
]


@dataclass
class RunStats:
    """One row of the per-run table."""

    arm: str
    seed: int | None
    path: str
    status: str
    complete: bool
    steps_completed: int
    total_steps: int | None
    final_reward: float | None
    best_reward: float | None
    collapse_step: int | None
    collapse_rule: str | None
    collapse_detail: str | None
    median_logp_abs_diff: float | None
    median_seq_kl: float | None
    steps_per_s: float | None


@dataclass
class ArmStats:
    """One row of the per-arm table, over the arm's complete runs."""

    arm: str
    runs: int
    complete_runs: int
    expected_runs: int
    final_reward_mean: float | None
    final_reward_std: float | None
    best_reward_mean: float | None
    collapses: int
    median_logp_abs_diff: float | None
    median_seq_kl: float | None
    steps_per_s: float | None


@dataclass
class Comparison:
    """``arm`` minus ``reference`` on the seeds both completed."""

    reference: str
    arm: str
    paired_seeds: list[int]
    final_reward_diff_per_seed: dict[str, float]
    final_reward_diff_mean: float | None
    final_reward_diff_ci: tuple[float, float] | None
    logp_abs_diff_diff_per_seed: dict[str, float]
    logp_abs_diff_diff_mean: float | None
    logp_abs_diff_diff_ci: tuple[float, float] | None
    logp_abs_diff_ratio_per_seed: dict[str, float]
    logp_abs_diff_ratio: float | None
    logp_abs_diff_ratio_ci: tuple[float, float] | None
    collapses: dict[str, list[int]]  # {"arm": [collapses, complete runs], "reference": [...]}


@dataclass
class Analysis:
    """Everything report.json holds."""

    reference: str
    conclusion: list[str]
    arms: list[ArmStats]
    comparisons: list[Comparison]
    runs: list[RunStats]
    notes: list[str]
    method: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median_finite(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def steps_per_s(run: Run) -> float | None:
    """From summary.json when the run ended, else from the logged step times."""
    if run.summary and run.summary.get("steps_per_s") is not None:
        value = as_float(run.summary["steps_per_s"])
        return value if math.isfinite(value) else None
    times = run.values("time/step_s")
    total = float(np.nansum(times)) if np.isfinite(times).any() else 0.0
    return len(run.records) / total if total > 0 else None


def run_stats(run: Run) -> RunStats:
    summary = run.summary or {}
    return RunStats(
        arm=run.arm, seed=run.seed, path=str(run.path), status=run.status, complete=run.complete,
        steps_completed=int(run.steps[-1]), total_steps=summary.get("total_steps"),
        final_reward=final_reward(run.values(REWARD)), best_reward=best_reward(run.values(REWARD)),
        collapse_step=run.collapse_step, collapse_rule=summary.get("collapse_rule"),
        collapse_detail=summary.get("collapse_detail"), median_logp_abs_diff=median_finite(run.values(LOGP_DIFF)),
        median_seq_kl=median_finite(run.values(SEQ_KL)), steps_per_s=steps_per_s(run),
    )


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def arm_stats(arm: str, rows: list[RunStats], expected: int) -> ArmStats:
    """An arm's row, over its complete runs (an unfinished run has no final reward yet)."""
    complete = [row for row in rows if row.arm == arm and row.complete]
    finals = _present([row.final_reward for row in complete])
    return ArmStats(
        arm=arm, runs=sum(row.arm == arm for row in rows), complete_runs=len(complete), expected_runs=expected,
        final_reward_mean=float(np.mean(finals)) if finals else None,
        final_reward_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
        best_reward_mean=_mean(_present([row.best_reward for row in complete])),
        collapses=sum(row.collapse_step is not None for row in complete),
        median_logp_abs_diff=_median(_present([row.median_logp_abs_diff for row in complete])),
        median_seq_kl=_median(_present([row.median_seq_kl for row in complete])),
        steps_per_s=_mean(_present([row.steps_per_s for row in complete])),
    )


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None for fewer than 2 values (no spread to resample).

    Seeded, so the same runs always give the same report.
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def compare_arms(reference: str, arm: str, rows: list[RunStats], arms: dict[str, ArmStats]) -> Comparison:
    """``arm`` minus ``reference`` on each seed both completed: final reward, and mismatch as a ratio.

    Mismatch spans orders of magnitude, so it is compared as the per-seed ratio of median |Δlogp|
    (geometric mean, interval from the bootstrap of the log ratios); the plain differences are kept too.
    """
    by_seed = {name: {row.seed: row for row in rows if row.arm == name and row.complete and row.seed is not None}
               for name in (reference, arm)}
    seeds = sorted(set(by_seed[reference]) & set(by_seed[arm]))
    pairs = [(by_seed[reference][s], by_seed[arm][s]) for s in seeds]
    reward = [(s, b.final_reward - a.final_reward) for s, (a, b) in zip(seeds, pairs)
              if a.final_reward is not None and b.final_reward is not None]
    mismatch = [(s, a.median_logp_abs_diff, b.median_logp_abs_diff) for s, (a, b) in zip(seeds, pairs)
                if (a.median_logp_abs_diff or 0) > 0 and (b.median_logp_abs_diff or 0) > 0]
    log_ratios = [math.log(b / a) for _, a, b in mismatch]
    log_ci = bootstrap_ci(log_ratios)
    return Comparison(
        reference=reference, arm=arm, paired_seeds=seeds,
        final_reward_diff_per_seed={str(s): d for s, d in reward},
        final_reward_diff_mean=_mean([d for _, d in reward]),
        final_reward_diff_ci=bootstrap_ci([d for _, d in reward]),
        logp_abs_diff_diff_per_seed={str(s): b - a for s, a, b in mismatch},
        logp_abs_diff_diff_mean=_mean([b - a for _, a, b in mismatch]),
        logp_abs_diff_diff_ci=bootstrap_ci([b - a for _, a, b in mismatch]),
        logp_abs_diff_ratio_per_seed={str(s): b / a for s, a, b in mismatch},
        logp_abs_diff_ratio=math.exp(np.mean(log_ratios)) if log_ratios else None,
        logp_abs_diff_ratio_ci=(math.exp(log_ci[0]), math.exp(log_ci[1])) if log_ci else None,
        collapses={"arm": [arms[arm].collapses, arms[arm].complete_runs],
                   "reference": [arms[reference].collapses, arms[reference].complete_runs]},
    )


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def reward_phrase(comparison: Comparison) -> str:
    """The final-reward part of a conclusion line: the direction only when the interval excludes 0."""
    n, mean, ci = (len(comparison.final_reward_diff_per_seed), comparison.final_reward_diff_mean,
                   comparison.final_reward_diff_ci)
    if n == 0:
        return "final reward: no seed completed in both arms, nothing to compare"
    if ci is None:
        return f"final reward {_signed(mean)} on 1 paired seed (no interval can be computed from a single seed)"
    interval = f"{_signed(mean)} [{_signed(ci[0])}, {_signed(ci[1])}] ({CONFIDENCE:.0%} CI, {n} paired seeds)"
    if ci[0] > 0:
        return f"final reward higher by {interval}"
    if ci[1] < 0:
        return f"final reward lower by {interval}"
    return f"no clear difference in final reward: {interval}, the interval includes 0"


def mismatch_phrase(comparison: Comparison) -> str | None:
    """The mismatch part: "median |Δlogp| 7.9x lower [5.1x, 12.3x]" (fold change and its interval)."""
    ratio, ci = comparison.logp_abs_diff_ratio, comparison.logp_abs_diff_ratio_ci
    if ratio is None:
        return None
    if ci is not None and ci[0] <= 1 <= ci[1]:
        return f"median |Δlogp| ratio {ratio:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]: no clear difference (interval includes 1)"
    lower = ratio < 1
    fold = 1 / ratio if lower else ratio
    text = f"median |Δlogp| {fold:.3g}x {'lower' if lower else 'higher'}"
    if ci is None:
        return text
    bounds = sorted(1 / b if lower else b for b in ci)
    return f"{text} [{bounds[0]:.3g}x, {bounds[1]:.3g}x]"


def conclusion_line(comparison: Comparison) -> str:
    """One line per arm vs the reference, built only from the computed numbers."""
    (k_arm, n_arm), (k_ref, n_ref) = comparison.collapses["arm"], comparison.collapses["reference"]
    parts = [reward_phrase(comparison), f"collapses {k_arm}/{n_arm} vs {k_ref}/{n_ref}"]
    mismatch = mismatch_phrase(comparison)
    if mismatch:
        parts.append(mismatch)
    return f"{comparison.arm} vs {comparison.reference}: " + "; ".join(parts)


def analyse(inputs: Inputs, reference: str | None = None) -> Analysis:
    """All the report's numbers, from loaded inputs."""
    reference = reference or inputs.arms[0]
    if reference not in inputs.arms:
        raise ReportError(f"reference arm {reference!r} is not among the arms: {', '.join(inputs.arms)}")
    order = {arm: i for i, arm in enumerate(inputs.arms)}
    runs = sorted((run_stats(r) for r in inputs.runs), key=lambda row: (order[row.arm], row.seed is None, row.seed or 0))
    arms = [arm_stats(arm, runs, inputs.expected.get(arm, 0)) for arm in inputs.arms]
    by_name = {a.arm: a for a in arms}
    comparisons = [compare_arms(reference, arm, runs, by_name) for arm in inputs.arms if arm != reference]
    if comparisons:
        conclusion = [conclusion_line(c) for c in comparisons]
    else:
        conclusion = [f"only one arm ({reference}): nothing to compare; pass runs of at least two arms "
                      "(e.g. a `fp16rl compare` folder)"]
    method = {"bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
              "interval": "percentile", "complete_statuses": list(DONE_STATUSES),
              "final_reward": "mean reward/mean over the last 10% of logged steps (at least 1)",
              "best_reward": f"best {BEST_WINDOW}-step moving average of reward/mean", "band": "min-max over seeds",
              "text": METHOD}
    return Analysis(reference, conclusion, arms, comparisons, runs, list(inputs.notes), method)
