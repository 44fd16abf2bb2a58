"""The report's figures: per-step curves of each arm (mean over seeds, min-max band, faint single seeds)."""

from __future__ import annotations

import io
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fp16rl.report.load import Inputs, Run
from fp16rl.report.stats import LOGP_DIFF, REWARD, SEQ_KL


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
    # Asynchronous runs only (--max-staleness K): beside the mismatch, which is then precision alone, the
    # policy's move since the weights that sampled (the trainer at step t against itself at t-K).
    FigureSpec("staleness.png", "Policy move since sampling, --max-staleness (log scale)", (
        Panel("staleness/logp_abs_diff_mean", "mean |Δlogp| per token", True),
        Panel("staleness/seq_kl", "sequence KL[π(t-K)||π(t)] (k1 estimate)", True),
    )),
    FigureSpec("truncated_ratio.png", "Completions cut at the length limit",
               (Panel("completion/truncated_ratio", "completion/truncated_ratio", False),)),
    FigureSpec("entropy.png", "Policy entropy", (Panel("policy/entropy", "policy/entropy", False),)),
    FigureSpec("grad_norm.png", "Gradient norm (log scale)", (Panel("optim/grad_norm", "optim/grad_norm", True),)),
    FigureSpec("loss_scale.png", "fp16 loss scale (log scale)",
               (Panel("optim/loss_scale", "optim/loss_scale", True, smooth=False, log_base=2),)),
    # ARC runs only: a reward that rises or falls with this share is reward hacking, not skill (monitor rule
    # reward_hacking).
    FigureSpec("copy_fraction.png", "ARC: share of completions judged to copy the shown outputs",
               (Panel("arc/copy_fraction", "arc/copy_fraction", False),)),
)


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


def plot_figure(spec: FigureSpec, inputs: Inputs, window: int) -> bytes | None:
    """One figure as PNG bytes (the caller writes them atomically); None when no run logged its metrics."""
    panels = [p for p in spec.panels if any(r.has(p.metric) for r in inputs.runs)]
    if not panels:
        return None
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


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


_LEGEND_WIDTH = 60  # characters per legend line at font size 8 in a 6.4-inch panel


def arm_labels(arms: Sequence[str]) -> tuple[dict[str, str], str]:
    """Each arm's legend label and the options every arm shares. Arm names are comma-separated overrides
    (``dtype=bfloat16,loss_type=grpo,...``); a legend that repeats the shared ones leaves no room for the
    plot, so each label keeps what tells the arms apart and the shared part is said once."""
    parts = {arm: arm.split(",") for arm in arms}
    shared = [p for p in parts[arms[0]] if all(p in parts[a] for a in arms)] if len(arms) > 1 else []
    labels = {arm: ",".join(p for p in parts[arm] if p not in shared) or arm for arm in arms}
    return {arm: textwrap.fill(label, _LEGEND_WIDTH) for arm, label in labels.items()}, ",".join(shared)


def _legend(ax: Any, arms: Sequence[str], colours: dict[str, Any], drawn: _Drawn) -> None:
    from matplotlib.lines import Line2D

    labels, shared = arm_labels(arms)
    handles = [Line2D([], [], color=colours[arm], linewidth=2, label=f"{labels[arm]} ({n} seed{'s' * (n != 1)})")
               for arm in arms if (n := drawn.seeds.get(arm, 0))]
    if drawn.partial:
        handles.append(Line2D([], [], color="grey", linewidth=1.3, linestyle="--",
                              label="mean over the seeds not yet stopped"))
    if drawn.collapse:
        handles.append(Line2D([], [], color="black", marker="x", markersize=8, markeredgewidth=2, linestyle="none",
                              label="collapse detected"))
    title = textwrap.fill(f"every arm: {shared}", _LEGEND_WIDTH) if shared else None
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85, title=title, title_fontsize=8)
