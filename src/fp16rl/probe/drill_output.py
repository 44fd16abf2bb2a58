"""What ``fp16rl probe --drill-down`` writes: drill_down.json, drill_down.md (where the error enters, how it
grows, the largest contributors) and drill_down.png (relative error per layer, one line per dtype)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from fp16rl.core.atomic import atomic_write_bytes, atomic_write_text
from fp16rl.runs.tracking import jsonable

# Figure panels: (title, key suffix of the per-layer points).
PANELS = (("residual stream (layer output)", "output"), ("attention output", "attention"), ("MLP output", "mlp"),
          ("input norm", "input_layernorm"), ("post-attention norm", "post_attention_layernorm"))
_LAYER_KEY = re.compile(r"^layer\.(\d+)\.(.+)$")


def layer_curve(dtype_doc: dict[str, Any], suffix: str, pair: str = "sampler_vs_trainer") -> list[tuple[int, float]]:
    """(layer, relative error) of the points ``layer.<i>.<suffix>``."""
    curve = []
    for key, errors in dtype_doc["relative_error"].items():
        match = _LAYER_KEY.match(key)
        if match and match.group(2) == suffix:
            curve.append((int(match.group(1)), errors[pair]))
    return sorted(curve)


def dtype_summary(dtype: str, doc: dict[str, Any], top: int = 3) -> str:
    """One line: where the sampler/trainer error enters, how the residual stream's grows, the largest
    contributors (submodule outputs whose difference is the largest share of their layer's residual
    norm, ``||Δ sub|| / ||residual_ref||``), and the final logits' error against each side's own."""
    errors = doc["relative_error"]
    entry = next(((k, e["sampler_vs_trainer"]) for k, e in errors.items() if e["sampler_vs_trainer"] > 0), None)
    if entry is None:
        return f"{dtype}: the sampler and the trainer agree exactly at every recorded point"
    residual = layer_curve(doc, "output")
    first, last = residual[0], residual[-1]
    growth = last[1] / first[1] if first[1] > 0 else float("inf")
    shares = []
    for key, e in errors.items():
        match = _LAYER_KEY.match(key)
        if match and match.group(2) != "output":
            norm = errors[f"layer.{match.group(1)}.output"]["reference_norm"]
            shares.append((e["abs_sampler_vs_trainer"] / norm if norm > 0 else 0.0, key))
    largest = ", ".join(f"{key} ({share:.2%} of its layer's residual norm)"
                        for share, key in sorted(shares, reverse=True)[:top])
    logits = errors["logits"]
    return (f"{dtype}: the error enters at {entry[0]} (relative {entry[1]:.2g}); the residual stream's grows "
            f"x{growth:.3g} from layer {first[0]} ({first[1]:.2g}) to layer {last[0]} ({last[1]:.2g}); final logits "
            f"{logits['sampler_vs_trainer']:.2g} (each engine vs fp32: sampler {logits['sampler_vs_reference']:.2g}, "
            f"trainer {logits['trainer_vs_reference']:.2g}); largest contributors: {largest}")


def ratio_lines(doc: dict[str, Any], probe_logp: dict[str, float] | None = None) -> list[str]:
    """bf16/fp16 ratios: the final-logit relative error, the mean |Δlogp| on the drill-down's tokens and, when
    given, the probe's mean |Δlogp| (``probe_logp``: dtype -> value) that the drill-down explains."""
    dtypes = doc["dtypes"]
    if not {"bfloat16", "float16"} <= set(dtypes):
        return []
    bf16, fp16 = dtypes["bfloat16"], dtypes["float16"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3g}x" if b > 0 else "inf"

    logits = ratio(bf16["relative_error"]["logits"]["sampler_vs_trainer"],
                   fp16["relative_error"]["logits"]["sampler_vs_trainer"])
    logp = ratio(bf16["logprob_abs_diff_mean"]["sampler_vs_trainer"], fp16["logprob_abs_diff_mean"]["sampler_vs_trainer"])
    lines = [f"bf16/fp16: final-logit relative error {logits}, mean |Δlogp| on these tokens {logp}"]
    if probe_logp and {"bfloat16", "float16"} <= set(probe_logp):
        lines.append(f"bf16/fp16 mean |Δlogp| in the probe: {ratio(probe_logp['bfloat16'], probe_logp['float16'])}")
    return lines


def markdown(doc: dict[str, Any], lines: list[str], figure: str) -> str:
    """drill_down.md: the summary lines and a table of the residual stream's relative error per layer."""
    dtypes = list(doc["dtypes"])
    out = ["# Drill-down: where the sampler and the trainer part ways", "",
           f"Model {doc['model']}; {doc['settings']['samples']} completions per dtype, decoded in batches of "
           f"{doc['settings']['batch_size']} ({doc['settings']['attn']}); relative error = ||a_sampler - a_trainer|| "
           "/ ||a_fp32|| over every completion token.", ""]
    out += [f"- {line}" for line in lines] + [""]
    out += ["| point | " + " | ".join(f"{d} s-t | {d} s-fp32 | {d} t-fp32" for d in dtypes) + " |",
            "|---|" + "---:|" * (3 * len(dtypes))]
    for key in doc["keys"]:
        if key.endswith(".output") or key in ("embedding", "final_norm", "logits"):
            cells = [f"{doc['dtypes'][d]['relative_error'][key][p]:.2e}" for d in dtypes
                     for p in ("sampler_vs_trainer", "sampler_vs_reference", "trainer_vs_reference")]
            out.append(f"| {key} | " + " | ".join(cells) + " |")
    out += ["", f"![relative error per layer]({figure})", ""]
    return "\n".join(out)


def plot(doc: dict[str, Any]) -> bytes:
    """PNG: one panel per submodule kind; x = layer, y = relative error (log); solid = sampler vs trainer,
    dotted = sampler vs fp32; one colour per dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(PANELS) + 0.6, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), squeeze=False)[0]
    colours = {"bfloat16": "tab:red", "float16": "tab:blue", "float32": "tab:gray"}
    for ax, (title, suffix) in zip(axes, PANELS):
        for dtype, dtype_doc in doc["dtypes"].items():
            for pair, style in (("sampler_vs_trainer", "-"), ("sampler_vs_reference", ":")):
                curve = [(x, y) for x, y in layer_curve(dtype_doc, suffix, pair) if y > 0]
                if curve:
                    ax.plot(*zip(*curve), style, color=colours.get(dtype), marker="." if style == "-" else None,
                            label=f"{dtype} {'sampler vs trainer' if style == '-' else 'sampler vs fp32'}")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||Δ|| / ||fp32||")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()


def write_drill_down(doc: dict[str, Any], output_dir: Path, probe_logp: dict[str, float] | None = None) -> list[str]:
    """drill_down.json (with the summary lines), drill_down.md and drill_down.png in ``output_dir``;
    returns the summary lines."""
    lines = [dtype_summary(dtype, d) for dtype, d in doc["dtypes"].items()] + ratio_lines(doc, probe_logp)
    doc = {**doc, "summary": lines}
    atomic_write_text(output_dir / "drill_down.json", json.dumps(jsonable(doc), indent=2) + "\n")
    atomic_write_text(output_dir / "drill_down.md", markdown(doc, lines, "drill_down.png"))
    atomic_write_bytes(output_dir / "drill_down.png", plot(doc))
    return lines
