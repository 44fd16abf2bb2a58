"""The report's numbers, typed: per run, per arm, and each arm against the reference on paired seeds.

Every row is a dataclass (a mistyped field is an error, not a silent None); ``Analysis.to_json`` is
what report.json holds. The conclusion lines are built from these numbers only. The intervals and
tests are in inference.py (they hold at 2 to 10 seeds), the per-prompt comparison in prompts.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from fp16rl.core.errors import ReportError
from fp16rl.report.inference import (ALPHA, EXACT_FLIPS_MAX_N, FLIP_SEED, MONTE_CARLO_FLIPS, POWER, Equivalence,
                                     min_seeds_for_decision, seeds_needed, sign_flip_p, t_interval, tost)
from fp16rl.report.load import Inputs, Run, as_float
from fp16rl.report.prompts import PromptComparison, compare_prompts, read_prompt_rewards
from fp16rl.runs.folders import DONE_STATUSES
from fp16rl.runs.tracking import best_reward, final_reward

REWARD = "reward/mean"
LOGP_DIFF = "mismatch/logp_abs_diff_mean"
SEQ_KL = "mismatch/seq_kl"
CONFIDENCE = 1 - ALPHA
MIN_SEEDS = min_seeds_for_decision(ALPHA)  # 6 at alpha 0.05
MARGIN_SHARE = 0.1  # default equivalence margin: this share of the reward range the compared runs logged

METHOD = [
    "Final reward: mean reward/mean over the last 10% of a run's logged steps (at least one); best reward: "
    "best mean over as many consecutive steps, so never below the final (the definitions of summary.json). "
    "Non-finite values are ignored.",
    "Median mismatch: median over a run's steps of mismatch/logp_abs_diff_mean (mean |log π - log μ| per token) "
    "and of mismatch/seq_kl; per arm, the median of its runs' medians.",
    "Per-arm numbers and the comparison use complete runs only (status finished or stopped_on_collapse); "
    "unfinished runs appear in the run table and the plots.",
    "Paired comparison: for each seed with a complete run in both arms (same prompts, augmentation and sampling "
    "seeds), the arm's final reward minus the reference's. Interval: mean ± t(0.975, n-1)·sd/√n (Student t, "
    f"{CONFIDENCE:.0%}). Test: the exact sign-flip permutation test of the differences (all 2^n sign vectors up "
    f"to n = {EXACT_FLIPS_MAX_N}, else {MONTE_CARLO_FLIPS:,} random ones, numpy seed {FLIP_SEED}).",
    f"Decision: a difference is claimed when the {CONFIDENCE:.0%} interval excludes 0 and the sign-flip p < {ALPHA}; "
    f"equivalence within ±margin when the {1 - 2 * ALPHA:.0%} interval lies inside ±margin (TOST, two one-sided "
    f"t-tests at {ALPHA}). With fewer than {MIN_SEEDS} paired seeds the comparison cannot decide: the sign-flip "
    f"test's smallest p-value is 2/2^n ({2 / 2 ** (MIN_SEEDS - 1):.4f} at {MIN_SEEDS - 1} seeds), and normality, "
    "which the t interval assumes, cannot be checked.",
    f"Margin: --margin in reward units, else {MARGIN_SHARE:.0%} of the range of reward/mean over the logged "
    "steps of the complete runs.",
    f"Seeds needed: the fewest paired seeds (at least {MIN_SEEDS}) at which the two-sided t-test at {ALPHA} has "
    f"{POWER:.0%} power (exact noncentral t), with the SD of the per-seed differences observed here, for the "
    "observed mean difference and for a difference the size of the margin.",
    "Per prompt: from samples/ (the completions the trainer saves every save_samples_steps steps), a prompt's "
    "reward is the mean over its completions; the arm's minus the reference's for every (seed, step, prompt uid) "
    "both recorded, averaged over seeds per (step, uid). Better/worse/tied shares and the exact sign test (ties "
    "dropped). It treats prompts as independent, which the shared training trajectory of a seed makes only "
    "approximately true: the seed-level test decides.",
    "Mismatch: per-seed ratio arm/reference of the median |Δlogp|, geometric mean, Student t interval on the log "
    "ratios.",
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
    skipped_steps: int | None  # optimizer steps skipped (fp16 overflow); None when the run did not log it


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
    final_reward_diff_sd: float | None
    final_reward_diff_ci: tuple[float, float] | None  # 95% Student t
    final_reward_sign_flip_p: float | None
    final_reward_sign_flip_exact: bool | None  # False: Monte Carlo (more than 16 seeds)
    equivalence: Equivalence | None  # TOST at the report's margin; None below 2 seeds or without a margin
    decision: str  # higher | lower | equivalent | inconclusive | too few seeds | no pairs
    seeds_needed: dict[str, int | None]  # {"observed": n, "margin": n} for 80% power
    per_prompt: PromptComparison | None
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
        skipped_steps=run.skipped_steps,
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


def decide(differences: list[float], ci: tuple[float, float] | None, flip_p: float | None,
           equivalence: Equivalence | None) -> str:
    """The reward decision: a direction only when the t interval excludes 0 and the sign-flip test
    rejects, equivalence when TOST holds, nothing below ``MIN_SEEDS`` paired seeds."""
    if not differences:
        return "no pairs"
    if len(differences) < MIN_SEEDS or ci is None or flip_p is None:
        return "too few seeds"
    if flip_p < ALPHA and (ci[0] > 0 or ci[1] < 0):
        return "higher" if ci[0] > 0 else "lower"
    if equivalence is not None and equivalence.equivalent:
        return "equivalent"
    return "inconclusive"


def seeds_for_power(differences: list[float], margin: float | None) -> dict[str, int | None]:
    """Paired seeds for 80% power with the observed SD: for the observed mean and for the margin."""
    if len(differences) < 2:
        return {"observed": None, "margin": None}
    mean, sd = float(np.mean(differences)), float(np.std(differences, ddof=1))
    return {"observed": seeds_needed(mean, sd), "margin": seeds_needed(margin, sd) if margin else None}


def paired_seeds(reference: str, arm: str, rows: list[RunStats]) -> list[tuple[int, RunStats, RunStats]]:
    """(seed, reference row, arm row) for every seed both arms completed."""
    by_seed = {name: {row.seed: row for row in rows if row.arm == name and row.complete and row.seed is not None}
               for name in (reference, arm)}
    return [(s, by_seed[reference][s], by_seed[arm][s]) for s in sorted(set(by_seed[reference]) & set(by_seed[arm]))]


def compare_arms(reference: str, arm: str, rows: list[RunStats], arms: dict[str, ArmStats], margin: float | None,
                 prompt_rewards: dict[tuple[str, int], dict]) -> Comparison:
    """``arm`` minus ``reference`` on each seed both completed: final reward, and mismatch as a ratio.

    Mismatch spans orders of magnitude, so it is compared as the per-seed ratio of median |Δlogp|
    (geometric mean, t interval of the log ratios); the plain differences are kept too.
    ``prompt_rewards``: {(arm, seed): {(step, uid): reward}} for the per-prompt comparison.
    """
    pairs = paired_seeds(reference, arm, rows)
    seeds = [s for s, _, _ in pairs]
    reward = [(s, b.final_reward - a.final_reward) for s, a, b in pairs
              if a.final_reward is not None and b.final_reward is not None]
    diffs = [d for _, d in reward]
    mismatch = [(s, a.median_logp_abs_diff, b.median_logp_abs_diff) for s, a, b in pairs
                if (a.median_logp_abs_diff or 0) > 0 and (b.median_logp_abs_diff or 0) > 0]
    log_ratios = [math.log(b / a) for _, a, b in mismatch]
    log_ci = t_interval(log_ratios)
    ci = t_interval(diffs)
    flip_p, exact = sign_flip_p(diffs) if diffs else (None, None)
    equivalence = tost(diffs, margin) if margin else None
    by_arm = {name: {s: prompt_rewards.get((name, s), {}) for s in seeds} for name in (reference, arm)}
    return Comparison(
        reference=reference, arm=arm, paired_seeds=seeds,
        final_reward_diff_per_seed={str(s): d for s, d in reward},
        final_reward_diff_mean=_mean(diffs),
        final_reward_diff_sd=float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
        final_reward_diff_ci=ci, final_reward_sign_flip_p=flip_p, final_reward_sign_flip_exact=exact,
        equivalence=equivalence, decision=decide(diffs, ci, flip_p, equivalence),
        seeds_needed=seeds_for_power(diffs, margin),
        per_prompt=compare_prompts(by_arm[reference], by_arm[arm]),
        logp_abs_diff_diff_per_seed={str(s): b - a for s, a, b in mismatch},
        logp_abs_diff_diff_mean=_mean([b - a for _, a, b in mismatch]),
        logp_abs_diff_diff_ci=t_interval([b - a for _, a, b in mismatch]),
        logp_abs_diff_ratio_per_seed={str(s): b / a for s, a, b in mismatch},
        logp_abs_diff_ratio=math.exp(np.mean(log_ratios)) if log_ratios else None,
        logp_abs_diff_ratio_ci=(math.exp(log_ci[0]), math.exp(log_ci[1])) if log_ci else None,
        collapses={"arm": [arms[arm].collapses, arms[arm].complete_runs],
                   "reference": [arms[reference].collapses, arms[reference].complete_runs]},
    )


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _interval(ci: tuple[float, float]) -> str:
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def equivalence_phrase(comparison: Comparison) -> str:
    """TOST in words: "within ±0.050 (90% CI [..], TOST p=..)", "not shown within ..", or, below the
    seeds a decision needs, the interval against the margin without a verdict."""
    eq = comparison.equivalence
    if eq is None:
        return "equivalence not tested (no margin: the reward never varied; pass --margin)"
    numbers = f"{1 - 2 * ALPHA:.0%} CI {_interval(eq.ci)}, TOST {_p(eq.p)}"
    if comparison.decision == "too few seeds":
        return f"margin ±{eq.margin:.3g} ({numbers})"
    return f"{'within' if eq.equivalent else 'not shown within'} ±{eq.margin:.3g} ({numbers})"


def reward_phrase(comparison: Comparison) -> str:
    """The final-reward part of a conclusion line: a direction or equivalence only where the decision allows."""
    c = comparison
    n, mean, ci = len(c.final_reward_diff_per_seed), c.final_reward_diff_mean, c.final_reward_diff_ci
    if c.decision == "no pairs" or mean is None:
        return "final reward: no seed completed in both arms, nothing to compare"
    if ci is None:
        return (f"cannot decide on final reward: {_signed(mean)} on 1 paired seed (no interval can be computed "
                f"from a single seed), a decision needs at least {MIN_SEEDS} paired seeds")
    numbers = (f"{_signed(mean)} {_interval(ci)} ({CONFIDENCE:.0%} t-interval, {n} paired seeds; "
               f"sign-flip {_p(c.final_reward_sign_flip_p or 1.0)}); {equivalence_phrase(c)}")
    if c.decision == "too few seeds":
        return (f"cannot decide on final reward with {n} paired seeds (a decision needs at least {MIN_SEEDS}): "
                f"{numbers}")
    if c.decision in ("higher", "lower"):
        return f"final reward {c.decision} by {numbers}"
    if c.decision == "equivalent":
        return f"final reward equivalent: {numbers}"
    return f"inconclusive on final reward, neither a difference nor equivalence shown: {numbers}"


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


def prompt_phrase(comparison: Comparison) -> str:
    """The per-prompt line: shares of prompts better/worse/tied and the sign test."""
    head = f"{comparison.arm} vs {comparison.reference}, per prompt: "
    pp = comparison.per_prompt
    if pp is None:
        return head + "no prompt was recorded in samples/ by both arms at the same seed and step"
    shares = ", ".join(f"{label} on {count} ({count / pp.prompts:.0%})"
                       for label, count in (("better", pp.better), ("worse", pp.worse), ("tied", pp.tied)))
    return (f"{head}{pp.prompts} prompt{'s' * (pp.prompts != 1)} at {pp.steps} step{'s' * (pp.steps != 1)}, "
            f"{len(pp.seeds)} seed{'s' * (len(pp.seeds) != 1)}: {shares}; mean Δ reward {_signed(pp.diff_mean)}; "
            f"sign test {_p(pp.sign_test_p)} (prompts taken as independent; the seed-level test decides)")


def power_phrase(comparison: Comparison) -> str:
    """How many paired seeds an effect needs: for the observed difference and for the margin."""
    head = f"{comparison.arm} vs {comparison.reference}, seeds needed: "
    diffs = list(comparison.final_reward_diff_per_seed.values())
    sd, mean = comparison.final_reward_diff_sd, comparison.final_reward_diff_mean
    if sd is None or mean is None:
        return head + "unknown until at least 2 paired seeds give the SD of the differences"

    def count(n: int | None, effect: float) -> str:
        if effect == 0:
            return "none (no effect to detect)"
        return f"{n:,}" if n is not None else "more than 100,000"

    needed, eq = comparison.seeds_needed, comparison.equivalence
    text = f"{count(needed['observed'], mean)} paired seeds for the observed {_signed(mean)}"
    if eq is not None:
        text += f", {count(needed['margin'], eq.margin)} for ±{eq.margin:.3g} (the margin)"
    return (f"{head}{text} ({POWER:.0%} power, two-sided t-test at {ALPHA}, SD of the per-seed differences "
            f"{sd:.3g} from {len(diffs)} seeds)")


def conclusion_lines(comparison: Comparison) -> list[str]:
    """The lines for one arm vs the reference, built only from the computed numbers: the decision with
    collapses and mismatch, the per-prompt analysis, the seeds a decision would need."""
    (k_arm, n_arm), (k_ref, n_ref) = comparison.collapses["arm"], comparison.collapses["reference"]
    parts = [reward_phrase(comparison), f"collapses {k_arm}/{n_arm} vs {k_ref}/{n_ref}"]
    mismatch = mismatch_phrase(comparison)
    if mismatch:
        parts.append(mismatch)
    main = f"{comparison.arm} vs {comparison.reference}: " + "; ".join(parts)
    if comparison.decision == "no pairs":
        return [main]
    return [main, prompt_phrase(comparison), power_phrase(comparison)]


def default_margin(runs: Sequence[Run]) -> float | None:
    """``MARGIN_SHARE`` of the range of reward/mean over every logged step of the complete runs (the
    scale the reward moves on here); None when it never varied."""
    values = np.concatenate([run.values(REWARD) for run in runs if run.complete] or [np.array([])])
    values = values[np.isfinite(values)]
    spread = float(values.max() - values.min()) if values.size else 0.0
    return MARGIN_SHARE * spread if spread > 0 else None


def analyse(inputs: Inputs, reference: str | None = None, margin: float | None = None) -> Analysis:
    """All the report's numbers, from loaded inputs; ``margin``: the equivalence margin in reward units
    (default: ``default_margin``)."""
    reference = reference or inputs.arms[0]
    if reference not in inputs.arms:
        raise ReportError(f"reference arm {reference!r} is not among the arms: {', '.join(inputs.arms)}")
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise ReportError(f"--margin must be a positive number of reward units, got {margin}")
    margin_source = "--margin" if margin is not None else f"{MARGIN_SHARE:.0%} of the reward range"
    margin = margin if margin is not None else default_margin(inputs.runs)
    order = {arm: i for i, arm in enumerate(inputs.arms)}
    runs = sorted((run_stats(r) for r in inputs.runs), key=lambda row: (order[row.arm], row.seed is None, row.seed or 0))
    arms = [arm_stats(arm, runs, inputs.expected.get(arm, 0)) for arm in inputs.arms]
    by_name = {a.arm: a for a in arms}
    prompt_rewards = {(run.arm, run.seed): read_prompt_rewards(run.path) for run in inputs.runs
                      if run.complete and run.seed is not None}
    comparisons = [compare_arms(reference, arm, runs, by_name, margin, prompt_rewards)
                   for arm in inputs.arms if arm != reference]
    if comparisons:
        conclusion = [line for c in comparisons for line in conclusion_lines(c)]
    else:
        conclusion = [f"only one arm ({reference}): nothing to compare; pass runs of at least two arms "
                      "(e.g. a `fp16rl compare` folder)"]
    method = {"confidence": CONFIDENCE, "interval": "student t", "test": "exact sign-flip permutation",
              "alpha": ALPHA, "min_paired_seeds": MIN_SEEDS, "equivalence_margin": margin,
              "equivalence_margin_source": margin_source, "power": POWER, "complete_statuses": list(DONE_STATUSES),
              "final_reward": "mean reward/mean over the last 10% of logged steps (at least 1)",
              "best_reward": "best mean of reward/mean over as many consecutive steps as final_reward's",
              "band": "min-max over seeds",
              "text": METHOD}
    budget_notes = [note for run in inputs.runs if (note := run.budget_note) is not None]
    return Analysis(reference, conclusion, arms, comparisons, runs, list(inputs.notes) + budget_notes, method)
