"""`fp16rl report`: turn runs into plots, tables, a paired comparison and a conclusion.

The question a user brings is "does fp16 prevent my RL collapse?". One run per arm cannot
answer it, so the report works on arms x seeds (usually a `fp16rl compare` folder): per-step
curves with the spread over seeds, per-run and per-arm tables, and for every arm a comparison
with the reference arm on the *same seeds* (same prompts and sampling randomness), with a
bootstrap interval. The conclusion lines are computed from those numbers, never written in
advance.

Inputs (any mix): a run folder (metrics.jsonl, config.yaml, summary.json when it ended) or a
compare folder (compare.json + runs/<arm_slug>/seed-<seed>/). Outputs in one folder:
report.html (self-contained), report.md (+ the PNG files), report.json (the numbers).
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from fp16rl.errors import ReportError
from fp16rl.experiments import arm_slug
from fp16rl.runs import DONE_STATUSES  # a run whose outcome is known
from fp16rl.tracking import BEST_WINDOW, best_reward, final_reward, read_metrics

REWARD = "reward/mean"
LOGP_DIFF = "mismatch/logp_abs_diff_mean"
SEQ_KL = "mismatch/seq_kl"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
REPORT_FILES = ("report.html", "report.md", "report.json")
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class Panel:
    metric: str
    label: str
    log: bool
    smooth: bool = True  # a step function (the loss scale) is drawn as logged
    log_base: int = 10


@dataclass(frozen=True)
class FigureSpec:
    filename: str
    title: str
    panels: tuple[Panel, ...]


# What is plotted, in order; a panel whose metric no run logged is left out.
FIGURES = (
    FigureSpec("reward.png", "Reward", (Panel(REWARD, "reward/mean", False),)),
    FigureSpec("mismatch.png", "Sampler/trainer mismatch (log scale)", (
        Panel(LOGP_DIFF, "mean |Δlogp| per token", True),
        Panel(SEQ_KL, "sequence KL[μ||π] (k1 estimate)", True),
    )),
    FigureSpec("truncated_ratio.png", "Completions cut at the length limit",
               (Panel("completion/truncated_ratio", "completion/truncated_ratio", False),)),
    FigureSpec("entropy.png", "Policy entropy", (Panel("policy/entropy", "policy/entropy", False),)),
    FigureSpec("grad_norm.png", "Gradient norm (log scale)", (Panel("optim/grad_norm", "optim/grad_norm", True),)),
    FigureSpec("loss_scale.png", "fp16 loss scale (log scale)",
               (Panel("optim/loss_scale", "optim/loss_scale", True, smooth=False, log_base=2),)),
)


# --- loading -------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run as the report sees it: where it is, its arm and seed, its step records."""

    path: Path
    arm: str
    seed: int | None
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def status(self) -> str:
        """summary.json's status; "unfinished" when the run has not written one yet."""
        return str(self.summary.get("status")) if self.summary else "unfinished"

    @property
    def complete(self) -> bool:
        """Only runs whose outcome is known enter the paired comparison and the collapse counts."""
        return self.status in DONE_STATUSES

    @property
    def collapse_step(self) -> int | None:
        step = self.summary.get("collapse_step") if self.summary else None
        return int(step) if step is not None else None

    def values(self, metric: str) -> np.ndarray:
        """The metric at every logged step, NaN where missing or non-finite ("nan"/"inf" strings)."""
        return np.array([_as_float(r.get(metric)) for r in self.records], dtype=float)

    @property
    def steps(self) -> np.ndarray:
        return np.array([int(r["step"]) for r in self.records], dtype=int)

    def has(self, metric: str) -> bool:
        return bool(np.isfinite(self.values(metric)).any())


@dataclass
class Inputs:
    """Everything loaded from the paths: runs, arms in display order, expected runs per arm, notes."""

    runs: list[Run] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _as_float(value: Any) -> float:
    """A finite float, or NaN for missing, non-numeric and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def arm_label(config: dict[str, Any]) -> str:
    """A label for a run that has no arm name: its dtype, plus the ablation settings that differ."""
    def canon(value: Any) -> str:
        return DTYPE_ALIASES.get(str(value), str(value))

    parts = [f"dtype={canon(config.get('dtype', '?'))}"]
    for key in ("sampler_dtype", "trainer_dtype"):
        if config.get(key):
            parts.append(f"{key}={canon(config[key])}")
    if config.get("is_correction") not in (None, "none"):
        parts.append(f"is_correction={config['is_correction']}")
    return ",".join(parts)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err})") from None


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path} is not valid YAML ({err})") from None
    return document.get("config", {}) if isinstance(document, dict) else {}


def load_run(run_dir: Path, arm: str | None = None, seed: int | None = None) -> Run:
    """A run folder; ``arm``/``seed`` (from compare.json) win over what the run itself says."""
    summary = _read_json(run_dir / "summary.json")
    config = _read_config(run_dir)
    if arm is None:
        arm = (summary or {}).get("arm") or config.get("arm") or (arm_label(config) if config else run_dir.name)
    if seed is None:
        raw = config.get("seed", (summary or {}).get("seed"))
        seed = int(raw) if raw is not None else None
    return Run(run_dir, str(arm), seed, read_metrics(run_dir / "metrics.jsonl"), summary)


def load_compare(compare_dir: Path) -> Inputs:
    """The runs of a compare folder, arm by arm and seed by seed; missing ones become notes."""
    spec = _read_json(compare_dir / "compare.json") or {}
    arms = [a["name"] for a in spec.get("arms", [])]
    seeds = [int(s) for s in spec.get("seeds", [])]
    if not arms or not seeds:
        raise ReportError(f"{compare_dir / 'compare.json'} lists no arms or no seeds")
    inputs = Inputs(arms=list(arms), expected={arm: len(seeds) for arm in arms})
    for arm in arms:
        for seed in seeds:
            run_dir = compare_dir / "runs" / arm_slug(arm) / f"seed-{seed}"
            run = load_run(run_dir, arm=arm, seed=seed) if run_dir.is_dir() else None
            if run is None or not run.records:
                inputs.notes.append(f"{arm}, seed {seed}: {'no metrics yet' if run else 'no run folder'} "
                                    f"({run_dir}); left out")
                continue
            inputs.runs.append(run)
    if not inputs.runs:
        raise ReportError(f"{compare_dir} holds no metrics: none of its {len(arms) * len(seeds)} runs has logged a step")
    return inputs


def load_inputs(paths: Sequence[str | Path]) -> Inputs:
    """Runs from every path, in order; the arms appear in the order first seen."""
    if not paths:
        raise ReportError("no paths given: pass run folders or compare folders")
    inputs = Inputs()
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ReportError(f"{path} does not exist or is not a folder")
        if (path / "compare.json").is_file():
            part = load_compare(path)
        elif (path / "metrics.jsonl").is_file():
            run = load_run(path)
            if not run.records:
                raise ReportError(f"{path} holds no metrics (metrics.jsonl has no step records)")
            part = Inputs(runs=[run], arms=[run.arm], expected={run.arm: 1})
        else:
            raise ReportError(f"{path} is neither a run folder (metrics.jsonl) nor a compare folder (compare.json)")
        _merge(inputs, part)
    _check_unique(inputs.runs)
    return inputs


def _merge(into: Inputs, part: Inputs) -> None:
    for arm in part.arms:
        if arm not in into.arms:
            into.arms.append(arm)
        into.expected[arm] = into.expected.get(arm, 0) + part.expected.get(arm, 0)
    into.runs += part.runs
    into.notes += part.notes


def _check_unique(runs: Iterable[Run]) -> None:
    """Two runs for one (arm, seed) would make the pairing ambiguous."""
    seen: dict[tuple[str, int | None], Path] = {}
    for run in runs:
        key = (run.arm, run.seed)
        if key in seen and run.seed is not None:
            raise ReportError(f"two runs for arm {run.arm!r} seed {run.seed}: {seen[key]} and {run.path}; pass one")
        seen[key] = run.path


# --- numbers -------------------------------------------------------------------------------


def median_finite(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def steps_per_s(run: Run) -> float | None:
    """From summary.json when the run ended, else from the logged step times."""
    if run.summary and run.summary.get("steps_per_s") is not None:
        return _none_if_nan(_as_float(run.summary["steps_per_s"]))
    times = run.values("time/step_s")
    total = float(np.nansum(times)) if np.isfinite(times).any() else 0.0
    return len(run.records) / total if total > 0 else None


def _none_if_nan(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_stats(run: Run) -> dict[str, Any]:
    """One row of the per-run table."""
    summary = run.summary or {}
    return {
        "arm": run.arm,
        "seed": run.seed,
        "path": str(run.path),
        "status": run.status,
        "complete": run.complete,
        "steps_completed": int(run.steps[-1]),
        "total_steps": summary.get("total_steps"),
        "final_reward": final_reward(run.values(REWARD)),
        "best_reward": best_reward(run.values(REWARD)),
        "collapse_step": run.collapse_step,
        "collapse_rule": summary.get("collapse_rule"),
        "collapse_detail": summary.get("collapse_detail"),
        "median_logp_abs_diff": median_finite(run.values(LOGP_DIFF)),
        "median_seq_kl": median_finite(run.values(SEQ_KL)),
        "steps_per_s": steps_per_s(run),
    }


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in rows if row[key] is not None]


def arm_stats(arm: str, rows: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """One row of the per-arm table, over the arm's complete runs (an unfinished run has no final reward yet)."""
    complete = [row for row in rows if row["arm"] == arm and row["complete"]]
    finals = _values(complete, "final_reward")
    return {
        "arm": arm,
        "runs": sum(row["arm"] == arm for row in rows),
        "complete_runs": len(complete),
        "expected_runs": expected,
        "final_reward_mean": float(np.mean(finals)) if finals else None,
        "final_reward_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
        "best_reward_mean": _mean(_values(complete, "best_reward")),
        "collapses": sum(row["collapse_step"] is not None for row in complete),
        "median_logp_abs_diff": _median(_values(complete, "median_logp_abs_diff")),
        "median_seq_kl": _median(_values(complete, "median_seq_kl")),
        "steps_per_s": _mean(_values(complete, "steps_per_s")),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


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


def compare_arms(reference: str, arm: str, rows: list[dict[str, Any]], arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``arm`` minus ``reference`` on each seed both completed: final reward, and mismatch as a ratio.

    Mismatch spans orders of magnitude, so it is compared as the per-seed ratio of median |Δlogp|
    (geometric mean, interval from the bootstrap of the log ratios); the plain differences are kept too.
    """
    by_seed = {name: {row["seed"]: row for row in rows if row["arm"] == name and row["complete"]
                      and row["seed"] is not None} for name in (reference, arm)}
    seeds = sorted(set(by_seed[reference]) & set(by_seed[arm]))
    pairs = [(by_seed[reference][s], by_seed[arm][s]) for s in seeds]
    reward = [(s, b["final_reward"] - a["final_reward"]) for s, (a, b) in zip(seeds, pairs)
              if a["final_reward"] is not None and b["final_reward"] is not None]
    mismatch = [(s, a["median_logp_abs_diff"], b["median_logp_abs_diff"]) for s, (a, b) in zip(seeds, pairs)
                if (a["median_logp_abs_diff"] or 0) > 0 and (b["median_logp_abs_diff"] or 0) > 0]
    log_ratios = [math.log(b / a) for _, a, b in mismatch]
    log_ci = bootstrap_ci(log_ratios)
    return {
        "reference": reference,
        "arm": arm,
        "paired_seeds": seeds,
        "final_reward_diff_per_seed": {str(s): d for s, d in reward},
        "final_reward_diff_mean": _mean([d for _, d in reward]),
        "final_reward_diff_ci": bootstrap_ci([d for _, d in reward]),
        "logp_abs_diff_diff_per_seed": {str(s): b - a for s, a, b in mismatch},
        "logp_abs_diff_diff_mean": _mean([b - a for _, a, b in mismatch]),
        "logp_abs_diff_diff_ci": bootstrap_ci([b - a for _, a, b in mismatch]),
        "logp_abs_diff_ratio_per_seed": {str(s): b / a for s, a, b in mismatch},
        "logp_abs_diff_ratio": math.exp(np.mean(log_ratios)) if log_ratios else None,
        "logp_abs_diff_ratio_ci": (math.exp(log_ci[0]), math.exp(log_ci[1])) if log_ci else None,
        "collapses": {"arm": [arms[arm]["collapses"], arms[arm]["complete_runs"]],
                      "reference": [arms[reference]["collapses"], arms[reference]["complete_runs"]]},
    }


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def reward_phrase(comparison: dict[str, Any]) -> str:
    """The final-reward part of a conclusion line: the direction only when the interval excludes 0."""
    diffs = comparison["final_reward_diff_per_seed"]
    n, mean, ci = len(diffs), comparison["final_reward_diff_mean"], comparison["final_reward_diff_ci"]
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


def mismatch_phrase(comparison: dict[str, Any]) -> str | None:
    """The mismatch part: "median |Δlogp| 7.9x lower [5.1x, 12.3x]" (fold change and its interval)."""
    ratio, ci = comparison["logp_abs_diff_ratio"], comparison["logp_abs_diff_ratio_ci"]
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


def conclusion_line(comparison: dict[str, Any]) -> str:
    """One line per arm vs the reference, built only from the computed numbers."""
    (k_arm, n_arm), (k_ref, n_ref) = comparison["collapses"]["arm"], comparison["collapses"]["reference"]
    parts = [reward_phrase(comparison), f"collapses {k_arm}/{n_arm} vs {k_ref}/{n_ref}"]
    mismatch = mismatch_phrase(comparison)
    if mismatch:
        parts.append(mismatch)
    return f"{comparison['arm']} vs {comparison['reference']}: " + "; ".join(parts)


# --- plots ---------------------------------------------------------------------------------


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps, ignoring NaNs (NaN only where the window has no value)."""
    if window <= 1:
        return values.copy()
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def auto_window(runs: Sequence[Run]) -> int:
    """About 40 points of smoothing resolution per curve; no smoothing for short runs."""
    longest = max((len(r.records) for r in runs), default=0)
    return max(1, longest // 40)


def _series(run: Run, panel: Panel, window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Smoothed values of one run (in log10 on log panels) and how many non-positive values were dropped."""
    values = run.values(panel.metric)
    dropped = 0
    if panel.log:
        positive = values > 0
        dropped = int((np.isfinite(values) & ~positive).sum())
        values = np.where(positive, np.log10(np.where(positive, values, 1.0)), np.nan)
    return run.steps, moving_average(values, window if panel.smooth else 1), dropped


def _aggregate(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Steps any seed logged, and there the mean, min and max over seeds and how many seeds have a value."""
    steps = np.unique(np.concatenate([s for s, _ in series]))
    grid = np.full((len(series), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        grid[i, np.searchsorted(steps, s)] = v
    count = np.isfinite(grid).sum(axis=0)
    with warnings.catch_warnings():  # an all-NaN column (no seed has a value there) is NaN by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0), count


def _collapse_point(steps: np.ndarray, values: np.ndarray, step: int) -> tuple[float, float] | None:
    """Where to draw a run's collapse marker: its value at the collapse step (or the last one before)."""
    before = np.nonzero((steps <= step) & np.isfinite(values))[0]
    return (float(step), float(values[before[-1]])) if before.size else None


def _figure(ncols: int) -> tuple[Any, list[Any]]:
    """A figure on the Agg canvas directly: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols + 0.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def arm_colours(arms: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {arm: palette[i % len(palette)] for i, arm in enumerate(arms)}


@dataclass
class _Drawn:
    """What a figure ended up showing, so that its legend and caption list only that."""

    seeds: dict[str, int] = field(default_factory=dict)
    collapse: bool = False
    partial: bool = False
    smoothed: bool = False


def plot_figure(spec: FigureSpec, inputs: Inputs, path: Path, window: int) -> bool:
    """Draw one figure; False (nothing written) when no run logged any of its metrics."""
    panels = [p for p in spec.panels if any(r.has(p.metric) for r in inputs.runs)]
    if not panels:
        return False
    colours = arm_colours(inputs.arms)
    fig, axes = _figure(len(panels))
    drawn = _Drawn()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, inputs, colours, window, drawn)
    _legend(axes[0], inputs.arms, colours, drawn)
    caption = (f"line: mean over seeds{' (geometric)' if panels[0].log else ''}"
               f"{', dashed where some seeds have stopped' if drawn.partial else ''}; band: min-max over seeds; "
               f"thin lines: single seeds{'; x: collapse detected' if drawn.collapse else ''}"
               f"{f'; {window}-step trailing moving average' if drawn.smoothed else ''}")
    width = int(fig.get_figwidth() * 13)  # characters that fit at font size 9
    fig.suptitle(f"{spec.title} vs step\n" + textwrap.fill(caption, width), fontsize=9)
    fig.savefig(path, dpi=100)
    return True


def _draw_panel(ax: Any, panel: Panel, inputs: Inputs, colours: dict[str, Any], window: int, drawn: _Drawn) -> None:
    dropped, visible = 0, False
    for arm in inputs.arms:
        runs = [r for r in inputs.runs if r.arm == arm and r.has(panel.metric)]
        if not runs:
            continue
        drawn.seeds[arm] = max(drawn.seeds.get(arm, 0), len(runs))
        drawn.smoothed |= panel.smooth and window > 1
        style = "default" if panel.smooth else "steps-post"  # a loss scale holds its value until it changes
        series = []
        for run in runs:
            steps, values, lost = _series(run, panel, window)
            dropped += lost
            visible |= bool(np.isfinite(values).any())
            series.append((steps, values))
            ax.plot(steps, _unlog(values, panel), color=colours[arm], linewidth=0.8, alpha=0.45, drawstyle=style)
            point = _collapse_point(steps, values, run.collapse_step) if run.collapse_step is not None else None
            if point:
                drawn.collapse = True
                ax.plot(point[0], _unlog(np.array(point[1]), panel), marker="x", markersize=10, markeredgewidth=2.2,
                        color=colours[arm], linestyle="none", zorder=5)
        steps, mean, low, high, count = _aggregate(series)
        ax.fill_between(steps, _unlog(low, panel), _unlog(high, panel), where=count >= 2, color=colours[arm],
                        alpha=0.18, linewidth=0)
        # Where some seeds have stopped (collapse, unfinished) the mean is over fewer seeds: dashed, not solid.
        all_seeds = steps <= min(s[-1] for s, _ in series)
        if not all_seeds.all():
            drawn.partial = True
            ax.plot(steps, _unlog(mean, panel), color=colours[arm], linewidth=1.3, linestyle="--", drawstyle=style)
        ax.plot(steps, _unlog(np.where(all_seeds, mean, np.nan), panel), color=colours[arm], linewidth=2.0,
                drawstyle=style)
    if panel.log and visible:  # a log axis with nothing positive on it cannot be drawn
        ax.set_yscale("log", base=panel.log_base)
    note = f"\n({dropped} non-positive values not shown on the log scale)" if dropped else ""
    ax.set_title(panel.label + note, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.metric)
    ax.grid(True, alpha=0.3, which="both" if panel.log and panel.log_base == 10 else "major")


def _unlog(values: np.ndarray, panel: Panel) -> np.ndarray:
    return np.power(10.0, values) if panel.log else values


def _legend(ax: Any, arms: Sequence[str], colours: dict[str, Any], drawn: _Drawn) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[arm], linewidth=2, label=f"{arm} ({n} seed{'s' * (n != 1)})")
               for arm in arms if (n := drawn.seeds.get(arm, 0))]
    if drawn.partial:
        handles.append(Line2D([], [], color="grey", linewidth=1.3, linestyle="--",
                              label="mean over the seeds not yet stopped"))
    if drawn.collapse:
        handles.append(Line2D([], [], color="black", marker="x", markersize=8, markeredgewidth=2, linestyle="none",
                              label="collapse detected"))
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)


# --- the document --------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def _collapse_cell(row: dict[str, Any]) -> str:
    if row["collapse_step"] is None:
        return "-" if row["complete"] else "- (not finished)"
    return f"{row['collapse_step']} ({row['collapse_rule'] or '?'})"


def _mean_std(mean: float | None, std: float | None) -> str:
    return _fmt(mean) + (f" ± {std:.3f}" if std is not None else "")


def arm_table(arms: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "complete runs", "final reward (mean ± std)", "best reward (mean)", "collapses",
               "median |Δlogp|", "median seq KL", "steps/s"]
    rows = [[a["arm"], f"{a['complete_runs']}/{a['expected_runs']}",
             _mean_std(a["final_reward_mean"], a["final_reward_std"]),
             _fmt(a["best_reward_mean"]), f"{a['collapses']}/{a['complete_runs']}",
             _fmt(a["median_logp_abs_diff"], "{:.2e}"), _fmt(a["median_seq_kl"], "{:.2e}"),
             _fmt(a["steps_per_s"], "{:.3g}")]
            for a in arms]
    return headers, rows


def run_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "seed", "status", "steps", "final reward", "best reward", "collapse step (rule)",
               "median |Δlogp|", "median seq KL", "steps/s"]
    body = [[r["arm"], _fmt(r["seed"], "{}"), r["status"],
             f"{r['steps_completed']}/{r['total_steps']}" if r["total_steps"] else str(r["steps_completed"]),
             _fmt(r["final_reward"]), _fmt(r["best_reward"]), _collapse_cell(r),
             _fmt(r["median_logp_abs_diff"], "{:.2e}"), _fmt(r["median_seq_kl"], "{:.2e}"),
             _fmt(r["steps_per_s"], "{:.3g}")]
            for r in rows]
    return headers, body


def comparison_table(comparisons: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "paired seeds", "Δ final reward, mean [95% CI]", "Δ final reward per seed",
               "|Δlogp| ratio, geo. mean [95% CI]", "|Δlogp| ratio per seed", "collapses (arm vs ref.)"]
    rows = []
    for c in comparisons:
        ci, rci = c["final_reward_diff_ci"], c["logp_abs_diff_ratio_ci"]
        (k_arm, n_arm), (k_ref, n_ref) = c["collapses"]["arm"], c["collapses"]["reference"]
        rows.append([
            c["arm"], ", ".join(map(str, c["paired_seeds"])) or "none",
            _fmt(c["final_reward_diff_mean"], "{:+.3f}") + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no interval)"),
            ", ".join(f"{s}: {d:+.3f}" for s, d in c["final_reward_diff_per_seed"].items()) or "-",
            _fmt(c["logp_abs_diff_ratio"], "{:.3g}") + (f" [{rci[0]:.3g}, {rci[1]:.3g}]" if rci else ""),
            ", ".join(f"{s}: {r:.3g}" for s, r in c["logp_abs_diff_ratio_per_seed"].items()) or "-",
            f"{k_arm}/{n_arm} vs {k_ref}/{n_ref}",
        ])
    return headers, rows


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


def build_blocks(data: dict[str, Any], figures: list[tuple[str, str]]) -> list[tuple]:
    """The report as a list of blocks, rendered to both markdown and HTML so the two cannot drift."""
    blocks: list[tuple] = [("h1", "fp16rl report"), ("conclusion", data["conclusion"])]
    n_runs = len(data["runs"])
    blocks.append(("p", f"{n_runs} run{'s' * (n_runs != 1)} in {len(data['arms'])} arm"
                   f"{'s' * (len(data['arms']) != 1)} from: {', '.join(data['inputs'])}. "
                   f"Reference arm: {data['reference']}."))
    if data["notes"]:
        blocks.append(("list", data["notes"]))
    blocks += [("h2", "Arms"), ("table", *arm_table(data["arms"]))]
    if data["comparisons"]:
        blocks += [("h2", f"Paired comparison with the reference arm ({data['reference']})"),
                   ("table", *comparison_table(data["comparisons"]))]
    blocks += [("h2", "Runs"), ("table", *run_table(data["runs"])), ("h2", "Figures")]
    blocks += [("figure", name, title) for name, title in figures]
    blocks += [("h2", "Method"), ("list", METHOD)]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: list[tuple]) -> str:
    out: list[str] = []
    for kind, *rest in blocks:
        if kind == "h1":
            out += [f"# {rest[0]}", ""]
        elif kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind in ("list", "conclusion"):
            if kind == "conclusion":
                out += ["**Conclusion**", ""]
            out += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            headers, rows = rest
            out += ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows] + [""]
        elif kind == "figure":
            out += [f"![{rest[1]}]({rest[0]})", ""]
    return "\n".join(out)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em; color: #222; }
.conclusion { background: #eef5ff; border-left: 5px solid #3a78c3; padding: 0.6em 1.2em; font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin-bottom: 1em; }
"""


def render_html(blocks: list[tuple], images: dict[str, bytes]) -> str:
    """A single file: the figures are embedded as base64 data URIs, so it can be mailed or uploaded alone."""
    e = html.escape
    out = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>fp16rl report</title>',
           f"<style>{HTML_STYLE}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "conclusion":
            out.append('<div class="conclusion"><strong>Conclusion</strong><ul>'
                       + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul></div>")
        elif kind == "table":
            headers, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
        elif kind == "figure":
            data = base64.b64encode(images[rest[0]]).decode("ascii")
            out.append(f'<figure><img alt="{e(rest[1])}" src="data:image/png;base64,{data}"></figure>')
    out.append("</body></html>")
    return "\n".join(out)


# --- entry point ---------------------------------------------------------------------------


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything unless --overwrite: earlier results are never replaced by accident."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ReportError(f"output folder {out} is not empty; choose another or pass --overwrite")
        for name in REPORT_FILES + tuple(spec.filename for spec in FIGURES):
            (out / name).unlink(missing_ok=True)  # no stale figure survives from an earlier report
    out.mkdir(parents=True, exist_ok=True)


def analyse(inputs: Inputs, reference: str | None = None) -> dict[str, Any]:
    """All the report's numbers (what report.json holds), from loaded inputs."""
    reference = reference or inputs.arms[0]
    if reference not in inputs.arms:
        raise ReportError(f"reference arm {reference!r} is not among the arms: {', '.join(inputs.arms)}")
    order = {arm: i for i, arm in enumerate(inputs.arms)}
    runs = sorted((run_stats(r) for r in inputs.runs),
                  key=lambda row: (order[row["arm"]], row["seed"] is None, row["seed"] or 0))
    arms = [arm_stats(arm, runs, inputs.expected.get(arm, 0)) for arm in inputs.arms]
    by_name = {a["arm"]: a for a in arms}
    comparisons = [compare_arms(reference, arm, runs, by_name) for arm in inputs.arms if arm != reference]
    if comparisons:
        conclusion = [conclusion_line(c) for c in comparisons]
    else:
        conclusion = [f"only one arm ({reference}): nothing to compare; pass runs of at least two arms "
                      "(e.g. a `fp16rl compare` folder)"]
    return {"reference": reference, "conclusion": conclusion, "arms": arms, "comparisons": comparisons, "runs": runs,
            "notes": list(inputs.notes),
            "method": {"bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED,
                       "confidence": CONFIDENCE, "interval": "percentile", "complete_statuses": list(DONE_STATUSES),
                       "final_reward": "mean reward/mean over the last 10% of logged steps (at least 1)",
                       "best_reward": f"best {BEST_WINDOW}-step moving average of reward/mean",
                       "band": "min-max over seeds", "text": METHOD}}


def build_report(paths: Sequence[str | Path], out: str | Path, overwrite: bool = False, reference: str | None = None,
                 smooth: int | None = None) -> Path:
    """Load the runs under ``paths``, write report.html/.md/.json and the PNGs into ``out``; return report.html.

    ``reference``: the arm the others are compared with (default: the first arm). ``smooth``: moving
    average window in steps for the plots (default: about 1/40 of the longest run; 1 = none).
    """
    if smooth is not None and smooth < 1:
        raise ReportError(f"--smooth must be >= 1 (1 = no smoothing), got {smooth}")
    inputs = load_inputs(paths)
    data = {"inputs": [str(p) for p in paths], **analyse(inputs, reference)}  # bad input fails before any write
    out = Path(out)
    prepare_output_dir(out, overwrite)
    window = smooth if smooth is not None else auto_window(inputs.runs)
    figures, images = [], {}
    for spec in FIGURES:
        if plot_figure(spec, inputs, out / spec.filename, window):
            figures.append((spec.filename, spec.title))
            images[spec.filename] = (out / spec.filename).read_bytes()
    data["figures"] = [name for name, _ in figures]
    data["smoothing_window"] = window
    blocks = build_blocks(data, figures)
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, images))
    return out / "report.html"
