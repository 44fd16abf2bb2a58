"""The report as a document: blocks rendered to markdown and to one self-contained HTML file, and
``build_report``, which loads, analyses, plots and writes it all atomically."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from fp16rl.core.atomic import atomic_write_bytes, atomic_write_text
from fp16rl.core.errors import ReportError
from fp16rl.report.load import load_inputs
from fp16rl.report.plots import FIGURES, auto_window, plot_figure
from fp16rl.report.stats import METHOD, Analysis, ArmStats, Comparison, RunStats, analyse
from fp16rl.runs.folders import refuse_used_folder
from fp16rl.runs.tracking import jsonable

REPORT_FILES = ("report.html", "report.md", "report.json")


def _fmt(value: Any, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def _collapse_cell(row: RunStats) -> str:
    if row.collapse_step is None:
        return "-" if row.complete else "- (not finished)"
    return f"{row.collapse_step} ({row.collapse_rule or '?'})"


def _mean_std(mean: float | None, std: float | None) -> str:
    return _fmt(mean) + (f" ± {std:.3f}" if std is not None else "")


def arm_table(arms: list[ArmStats]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "complete runs", "final reward (mean ± std)", "best reward (mean)", "collapses",
               "median |Δlogp|", "median seq KL", "steps/s"]
    rows = [[a.arm, f"{a.complete_runs}/{a.expected_runs}",
             _mean_std(a.final_reward_mean, a.final_reward_std),
             _fmt(a.best_reward_mean), f"{a.collapses}/{a.complete_runs}",
             _fmt(a.median_logp_abs_diff, "{:.2e}"), _fmt(a.median_seq_kl, "{:.2e}"),
             _fmt(a.steps_per_s, "{:.3g}")]
            for a in arms]
    return headers, rows


def run_table(rows: list[RunStats]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "seed", "status", "steps", "final reward", "best reward", "collapse step (rule)",
               "median |Δlogp|", "median seq KL", "steps/s", "skipped steps"]
    body = [[r.arm, _fmt(r.seed, "{}"), r.status,
             f"{r.steps_completed}/{r.total_steps}" if r.total_steps else str(r.steps_completed),
             _fmt(r.final_reward), _fmt(r.best_reward), _collapse_cell(r),
             _fmt(r.median_logp_abs_diff, "{:.2e}"), _fmt(r.median_seq_kl, "{:.2e}"),
             _fmt(r.steps_per_s, "{:.3g}"), _fmt(r.skipped_steps, "{}")]
            for r in rows]
    return headers, body


def _equivalence_cell(c: Comparison) -> str:
    eq = c.equivalence
    if eq is None:
        return "-"
    verdict = "equivalent" if eq.equivalent else "not shown"
    return f"±{eq.margin:.3g}: [{eq.ci[0]:+.3f}, {eq.ci[1]:+.3f}], p={eq.p:.3g} ({verdict})"


def _seeds_needed_cell(c: Comparison) -> str:
    return " / ".join("-" if n is None else str(n) for n in (c.seeds_needed["observed"], c.seeds_needed["margin"]))


def comparison_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "paired seeds", "Δ final reward, mean [95% t CI]", "sign-flip p", "equivalence (TOST): margin, "
               "90% CI, p", "decision", "seeds for 80% power (observed / margin)", "Δ final reward per seed",
               "|Δlogp| ratio, geo. mean [95% t CI]", "|Δlogp| ratio per seed", "collapses (arm vs ref.)"]
    rows = []
    for c in comparisons:
        ci, rci = c.final_reward_diff_ci, c.logp_abs_diff_ratio_ci
        (k_arm, n_arm), (k_ref, n_ref) = c.collapses["arm"], c.collapses["reference"]
        rows.append([
            c.arm, ", ".join(map(str, c.paired_seeds)) or "none",
            _fmt(c.final_reward_diff_mean, "{:+.3f}") + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no interval)"),
            _fmt(c.final_reward_sign_flip_p, "{:.3g}"), _equivalence_cell(c), c.decision, _seeds_needed_cell(c),
            ", ".join(f"{s}: {d:+.3f}" for s, d in c.final_reward_diff_per_seed.items()) or "-",
            _fmt(c.logp_abs_diff_ratio, "{:.3g}") + (f" [{rci[0]:.3g}, {rci[1]:.3g}]" if rci else ""),
            ", ".join(f"{s}: {r:.3g}" for s, r in c.logp_abs_diff_ratio_per_seed.items()) or "-",
            f"{k_arm}/{n_arm} vs {k_ref}/{n_ref}",
        ])
    return headers, rows


def prompt_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    """Per prompt (step, uid in samples/): reward in each arm, the difference, better/worse/tied, sign test."""
    headers = ["arm", "prompts", "steps", "seeds", "reward (ref. / arm)", "mean Δ reward", "better / worse / tied",
               "sign test p"]
    rows = []
    for c in comparisons:
        pp = c.per_prompt
        if pp is None:
            rows.append([c.arm, "0", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([c.arm, str(pp.prompts), str(pp.steps), ", ".join(map(str, pp.seeds)),
                     f"{pp.reference_mean:.3f} / {pp.arm_mean:.3f}", f"{pp.diff_mean:+.3f}",
                     f"{pp.better} / {pp.worse} / {pp.tied}", f"{pp.sign_test_p:.3g}"])
    return headers, rows


def build_blocks(data: Analysis, inputs: list[str], figures: list[tuple[str, str]]) -> list[tuple]:
    """The report as a list of blocks, rendered to both markdown and HTML so the two cannot drift."""
    blocks: list[tuple] = [("h1", "fp16rl report"), ("conclusion", data.conclusion)]
    n_runs = len(data.runs)
    blocks.append(("p", f"{n_runs} run{'s' * (n_runs != 1)} in {len(data.arms)} arm"
                   f"{'s' * (len(data.arms) != 1)} from: {', '.join(inputs)}. "
                   f"Reference arm: {data.reference}."))
    if data.notes:
        blocks.append(("list", data.notes))
    blocks += [("h2", "Arms"), ("table", *arm_table(data.arms))]
    if data.comparisons:
        blocks += [("h2", f"Paired comparison with the reference arm ({data.reference})"),
                   ("table", *comparison_table(data.comparisons)),
                   ("h2", "Per-prompt paired comparison (samples/)"), ("table", *prompt_table(data.comparisons))]
    blocks += [("h2", "Runs"), ("table", *run_table(data.runs)), ("h2", "Figures")]
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


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything unless --overwrite: earlier results are never replaced by accident."""
    if not overwrite or not out.is_dir():
        refuse_used_folder(out, "output folder", "choose another or pass --overwrite")
    if out.is_dir() and any(out.iterdir()):
        for name in REPORT_FILES + tuple(spec.filename for spec in FIGURES):
            (out / name).unlink(missing_ok=True)  # no stale figure survives from an earlier report
    out.mkdir(parents=True, exist_ok=True)


def build_report(paths: Sequence[str | Path], out: str | Path, overwrite: bool = False, reference: str | None = None,
                 smooth: int | None = None, margin: float | None = None) -> Path:
    """Load the runs under ``paths``, write report.html/.md/.json and the PNGs into ``out``; return report.html.

    ``reference``: the arm the others are compared with (default: the first arm). ``smooth``: moving
    average window in steps for the plots (default: about 1/40 of the longest run; 1 = none).
    ``margin``: the equivalence margin in reward units (default: 10% of the reward range). Every
    file is written atomically, so a reader never sees half a report.
    """
    if smooth is not None and smooth < 1:
        raise ReportError(f"--smooth must be >= 1 (1 = no smoothing), got {smooth}")
    inputs = load_inputs(paths)
    analysis = analyse(inputs, reference, margin)  # bad input fails before any write
    out = Path(out)
    prepare_output_dir(out, overwrite)
    window = smooth if smooth is not None else auto_window(inputs.runs)
    figures, images = [], {}
    for spec in FIGURES:
        image = plot_figure(spec, inputs, window)
        if image is not None:
            atomic_write_bytes(out / spec.filename, image)
            figures.append((spec.filename, spec.title))
            images[spec.filename] = image
    sources = [str(p) for p in paths]
    data = {"inputs": sources, **analysis.to_json(), "figures": [name for name, _ in figures],
            "smoothing_window": window}
    blocks = build_blocks(analysis, sources, figures)
    atomic_write_text(out / "report.json", json.dumps(jsonable(data), indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks, images))
    return out / "report.html"
