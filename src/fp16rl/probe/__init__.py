"""``fp16rl probe``: a model's sampler/trainer mismatch per dtype without training, and its fp16 range.

settings.py   ProbeSettings (the CLI options are generated from it) and the prompts
measure.py    the measurement (through ``fp16rl.measure.rollouts.measure_rollouts``, as a training step),
              metrics, results
range_check.py  the largest activation per layer against the fp16 maximum
output.py     probe.json, probe.md, figures, terminal tables
drill.py      ``--drill-down``: the sampler's decode and the trainer's forward layer by layer vs fp32
drill_output.py  drill_down.json, drill_down.md, drill_down.png

Imports: ``fp16rl.measure`` and every row below it (pyproject.toml [tool.importlinter]); not its
siblings training, report and tools.
"""

import importlib
from typing import Any

# Where each public name lives. Resolved on first use (PEP 562), so `fp16rl --help` and the CLI's
# option parsing (which read ProbeSettings) do not import torch.
_EXPORTS = {
    "ConfigResult": "measure", "ProbeResult": "measure", "probe_metrics": "measure", "run_probe": "measure",
    "comparison_lines": "output", "default_output_dir": "output", "render_tables": "output",
    "write_outputs": "output", "fp16_range_check": "range_check", "fp16_range_summary": "range_check",
    "BUILTIN_PROMPTS": "settings", "ProbeSettings": "settings", "encode_prompts": "settings",
    "read_prompt_texts": "settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fp16rl.probe' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fp16rl.probe.{_EXPORTS[name]}"), name)
