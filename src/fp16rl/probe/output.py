"""What ``fp16rl probe`` writes and shows: probe.json, probe.md, two figures, and the terminal tables."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from fp16rl.core.atomic import atomic_directory
from fp16rl.probe.measure import ConfigResult, ProbeResult
from fp16rl.probe.range_check import fp16_range_summary
from fp16rl.runs.folders import refuse_used_folder
from fp16rl.runs.tracking import jsonable

# Column order of the terminal and markdown tables: (metric key, header, format).
TABLE_COLUMNS = (
    ("probe/num_tokens", "tokens", "{:.0f}"),
    ("mismatch/logp_abs_diff_mean", "|Δlogp|\nmean", "{:.2e}"),
    ("mismatch/logp_abs_diff_max", "|Δlogp|\nmax", "{:.2e}"),
    ("mismatch/prob_abs_diff_mean", "|Δp|\nmean", "{:.2e}"),
    ("mismatch/prob_abs_diff_max", "|Δp|\nmax", "{:.2e}"),
    ("mismatch/token_kl_k1", "token KL\nk1", "{:.1e}"),
    ("mismatch/token_kl_k3", "token KL\nk3", "{:.1e}"),
    ("mismatch/seq_kl", "seq KL\n[μ||π]", "{:.1e}"),
    ("probe/seq_log_ratio_slope_per_1k", "log-ratio slope\n/1k tokens", "{:+.2e}"),
    ("probe/bitwise_equal_ratio", "bitwise\nequal", "{:.1%}"),
    ("mismatch/pearson_prob", "pearson\nprob", "{:.6f}"),
)




def default_output_dir(model_name: str, root: Path = Path("runs")) -> Path:
    """``runs/probe-<model>-<time>``: a fresh folder per call, so the default never collides."""
    base = root / f"probe-{model_name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def write_outputs(result: ProbeResult, output_dir: Path) -> dict[str, Path]:
    """probe.json, probe.md and the figures, written into ``output_dir`` atomically."""
    refuse_used_folder(output_dir, "--output-dir")
    names = {"json": "probe.json", "markdown": "probe.md", "token_probs": "token_probs.png",
             "seq_log_ratio": "seq_log_ratio.png"}
    with atomic_directory(output_dir) as tmp:
        (tmp / names["json"]).write_text(json.dumps(jsonable(result.to_json()), indent=2) + "\n")
        (tmp / names["markdown"]).write_text(markdown_report(result, names))
        plot_token_probs(result, tmp / names["token_probs"])
        plot_seq_log_ratio(result, tmp / names["seq_log_ratio"])
    return {key: output_dir / name for key, name in names.items()}


def _cell(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if math.isfinite(value) else str(value)


def table_rows(result: ProbeResult) -> list[list[str]]:
    """dtype, attn, batch size, then TABLE_COLUMNS, formatted; shared by the terminal and markdown tables."""
    return [[c.dtype, c.attn, str(c.batch_size), *(_cell(c.metrics.get(k), f) for k, _, f in TABLE_COLUMNS)]
            for c in result.configs]


def table_headers() -> list[str]:
    """Column headers of the markdown table (one row per configuration); "|" escaped for GFM tables."""
    return ["dtype", "attn", "batch", *(header.replace("\n", " ").replace("|", "\\|") for _, header, _ in TABLE_COLUMNS)]


def render_tables(result: ProbeResult, width: int = 80) -> list[Any]:
    """Rich Tables with one row per metric and one column per configuration.

    Metrics down the side keep a column narrow (~12 characters), so a few configurations fit an
    80-column terminal; more are split over several tables rather than truncated.
    """
    from rich.table import Table

    per_table = max(1, (width - 32) // 12)
    tables = []
    for start in range(0, len(result.configs), per_table):
        configs = result.configs[start : start + per_table]
        table = Table(title=f"{result.model.get('name')}: Δ = trainer - sampler logprob, same tokens",
                      title_style="bold")
        table.add_column("metric", no_wrap=True)
        for config in configs:
            table.add_column(f"{config.dtype}\n{config.attn} bs{config.batch_size}", justify="right", no_wrap=True)
        for key, header, fmt in TABLE_COLUMNS:
            table.add_row(header.replace("\n", " "), *(_cell(c.metrics.get(key), fmt) for c in configs))
        tables.append(table)
    return tables


def comparison_lines(result: ProbeResult) -> list[str]:
    """Plain-language ratios: bf16 vs fp16 mean |Δlogp| and seq KL for each (attn, batch size)."""
    lines = []
    by_key = {(c.dtype, c.attn, c.batch_size): c.metrics for c in result.configs}
    for (dtype, attn, batch), metrics in by_key.items():
        other = by_key.get(("float16", attn, batch))
        if dtype != "bfloat16" or other is None:
            continue
        a, b = metrics["mismatch/logp_abs_diff_mean"], other["mismatch/logp_abs_diff_mean"]
        ratio = f"{a / b:.1f}x" if b > 0 else "infinitely"
        lines.append(f"{attn}, batch {batch}: bf16 mean |Δlogp| {a:.2e} is {ratio} fp16's {b:.2e}; "
                     f"seq KL {metrics['mismatch/seq_kl']:.1e} vs {other['mismatch/seq_kl']:.1e}")
    return lines


def vocab_parity_lines(result: ProbeResult) -> list[str]:
    """probe.md's full-vocabulary section: KL(mu || pi) and TV over the whole vocabulary at a sample of
    positions (``measure/vocab.py``), by position in the completion and by the sampled token's mu."""
    rows = [(config.label, kind.removeprefix("by_").replace("_", " "), name, values)
            for config in result.configs for kind, strata in config.vocab_strata.items()
            for name, values in strata.items()]
    if not rows:
        return []
    out = ["## Full-vocabulary parity", "",
           "KL(μ‖π) = Σ_v μ_v (log μ_v - log π_v) and TV = ½ Σ_v |μ_v - π_v| over the whole vocabulary "
           "(float64), at a seeded sample of completion positions (t = position in the completion, μ = the "
           "sampler's probability of the token it drew there):", "",
           "| configuration | by | stratum | positions | mean KL | max KL | mean TV |", "|---|---|---|---|---|---|---|"]
    out += [f"| {label} | {kind} | {name} | {v['positions']:.0f} | {v['vocab_kl']:.2e} | {v['vocab_kl_max']:.2e} | "
            f"{v['vocab_tv']:.2e} |" for label, kind, name, v in rows]
    return out + [""]


def markdown_report(result: ProbeResult, files: dict[str, str]) -> str:
    """probe.md: the table, the plain-language comparison, the fp16 range check and the figures."""
    s = result.settings
    headers = table_headers()
    out = [
        f"# fp16rl probe: {result.model.get('name')}",
        "",
        f"Model `{result.model.get('path')}` ({result.model.get('architecture')}, "
        f"{result.model.get('num_parameters', 0) / 1e6:.1f}M parameters, FP32 master weights). "
        f"{s['num_samples']} completions per configuration from {s['num_prompts']} prompts ({s['prompts']}), "
        f"up to {s['max_new_tokens']} new tokens, temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}, "
        f"device {s['device']}; runtime {result.runtime_s:.0f} s.",
        "",
        "Sampler: `Sampler` with its weights cast to the dtype (KV-cache decoding). Trainer: the model a run "
        f"with these options trains ({'LoRA r=' + str(s['lora_r']) if s['lora_r'] else 'full fine-tuning'}, "
        f"`--trainer-compute {s['trainer_compute']}`), one full forward over the same tokens, through the "
        "measurement every training step makes (`batch.measure_rollouts`). Δ = trainer - sampler logprob. "
        "float32 is the correctness baseline (should be ~0).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(result)),
        "",
    ]
    comparisons = comparison_lines(result)
    if comparisons:
        out += [*(f"- {line}" for line in comparisons), ""]
    if result.fp16_range is not None:
        report = result.fp16_range
        out += ["## fp16 range", "", fp16_range_summary(report), "",
                f"Largest |activation| per decoder layer output in an fp32 forward over the prompts "
                f"(flagged above 65504 / {report['headroom_factor']:g} = {report['limit']:.0f}):", "",
                "| layer | max abs | headroom |", "|---|---|---|"]
        out += [f"| {e['name']} | {e['max_abs']:.4g} | {e['headroom']:.3g}x |" for e in report["layers"]]
        out += ["", "Largest Linear outputs: " + ", ".join(f"{m['name']} {m['max_abs']:.4g}" for m in report["top_modules"]),
                ""]
    out += vocab_parity_lines(result)
    out += ["## Figures", "", f"![token probabilities]({files['token_probs']})", "",
            f"![sequence log-ratio vs length]({files['seq_log_ratio']})", ""]
    return "\n".join(out)


def _figure(ncols: int, nrows: int = 1, panel: float = 4.2) -> tuple[Any, Any]:
    """A figure drawn with the Agg canvas directly: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel * ncols + 0.6, panel * nrows * 0.95 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _by_dtype(result: ProbeResult) -> dict[str, list[ConfigResult]]:
    groups: dict[str, list[ConfigResult]] = {}
    for config in result.configs:
        groups.setdefault(config.dtype, []).append(config)
    return groups


def _solid_legend(ax: Any, **kwargs: Any) -> None:
    """A legend whose markers are opaque, though the points they stand for are translucent."""
    legend = ax.legend(**kwargs)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)


def plot_token_probs(result: ProbeResult, path: Path) -> None:
    """Trainer vs sampler probability of every sampled token, one column per dtype.

    Top row: π against μ (the paper's scatter). At |Δp| ~ 1e-3 every dtype looks like a perfect
    diagonal there, so the bottom row plots the difference π - μ against μ on one y scale shared by
    all dtypes: the width of that band is the mismatch.
    """
    groups = _by_dtype(result)
    fig, axes = _figure(max(len(groups), 1), nrows=2)
    spread = max((c.trainer_logprobs.exp() - c.sampler_logprobs.exp()).abs().max().item()
                 for c in result.configs if c.sampler_logprobs.numel()) if result.configs else 0.0
    spread = 1.15 * spread if spread > 0 else 1e-6
    for column, (dtype, configs) in enumerate(groups.items()):
        top, bottom = axes[0][column], axes[1][column]
        for config in configs:
            p_mu, p_pi = config.sampler_logprobs.exp().numpy(), config.trainer_logprobs.exp().numpy()
            m = config.metrics
            label = (f"{config.attn} bs{config.batch_size}: mean |Δp| {m['mismatch/prob_abs_diff_mean']:.1e}, "
                     f"max {m['mismatch/prob_abs_diff_max']:.1e}")
            top.scatter(p_mu, p_pi, s=4, alpha=0.35, linewidths=0)
            bottom.scatter(p_mu, p_pi - p_mu, s=4, alpha=0.35, linewidths=0, label=label)
        top.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        bottom.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        if len(configs) == 1:
            m = configs[0].metrics
            top.set_title(f"{dtype}\nmean |Δp| {m['mismatch/prob_abs_diff_mean']:.1e}, "
                          f"max |Δp| {m['mismatch/prob_abs_diff_max']:.1e}, "
                          f"pearson {m['mismatch/pearson_prob']:.5f}", fontsize=9)
        else:
            top.set_title(dtype, fontsize=10)
            _solid_legend(bottom, fontsize=6.5, loc="lower right", markerscale=3)
        top.set_xlim(-0.02, 1.02)
        top.set_ylim(-0.02, 1.02)
        top.set_aspect("equal")
        bottom.set_xlim(-0.02, 1.02)
        bottom.set_ylim(-spread, spread)
        bottom.set_xlabel("sampler probability μ(y_t)")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0][0].set_ylabel("trainer probability π(y_t)")
    axes[1][0].set_ylabel("π(y_t) - μ(y_t)  (same scale in every panel)")
    fig.suptitle(f"{result.model.get('name')}: probability of each sampled token, trainer vs sampler", fontsize=11)
    fig.savefig(path, dpi=110)


def plot_seq_log_ratio(result: ProbeResult, path: Path) -> None:
    """Per completion, log π(y)/μ(y) = Σ_t Δlogp against its length, with the fitted slope; one panel per dtype.

    Panels share the y axis so the dtypes compare at a glance (bf16's spread vs fp16's).
    """
    groups = _by_dtype(result)
    fig, grid = _figure(max(len(groups), 1), panel=4.0)
    axes = grid[0]
    limit = max((c.seq_log_ratio.abs().max().item() for c in result.configs if c.seq_log_ratio.numel()), default=1.0)
    limit = 1.1 * limit if limit > 0 else 1.0
    longest = max((int(c.seq_lengths.max()) for c in result.configs if c.seq_lengths.numel()), default=1)
    for ax, (dtype, configs) in zip(axes, groups.items()):
        for config in configs:
            slope = config.metrics["probe/seq_log_ratio_slope_per_1k"]
            stderr = config.metrics["probe/seq_log_ratio_slope_stderr_per_1k"]
            name = f"{config.attn} bs{config.batch_size}: " if len(configs) > 1 else ""
            points = ax.scatter(config.seq_lengths.numpy(), config.seq_log_ratio.numpy(), s=14, alpha=0.7,
                                label=f"{name}slope {slope:+.3g} ± {stderr:.2g} per 1k tokens")
            if math.isfinite(slope):
                ax.plot([0, longest], [0, slope * longest / 1000], color=points.get_facecolor()[0][:3], linewidth=1.2)
        ax.axhline(0, color="grey", linewidth=0.6)
        single = len(configs) == 1  # several configurations: their seq KL is in the table, not the title
        ax.set_title(f"{dtype}: seq KL[μ||π] {configs[0].metrics['mismatch/seq_kl']:.2e}" if single else dtype,
                     fontsize=10)
        ax.set_xlabel("completion length (tokens)")
        ax.set_xlim(0, longest * 1.05)
        ax.set_ylim(-limit, limit)
        _solid_legend(ax, fontsize=7, loc="best", title="points: completions; line: least-squares fit",
                      title_fontsize=7)
    axes[0].set_ylabel("log π(y)/μ(y) = Σ_t (log π - log μ)")
    fig.suptitle(f"{result.model.get('name')}: sequence log-ratio vs length", fontsize=11)
    fig.savefig(path, dpi=110)
