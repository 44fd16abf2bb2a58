"""`fp16rl report`: turn runs into plots, tables, a paired comparison and a conclusion.

The question a user brings is "does fp16 prevent my RL collapse?". One run per arm cannot
answer it, so the report works on arms x seeds (usually a `fp16rl compare` folder): per-step
curves with the spread over seeds, per-run and per-arm tables, and for every arm a comparison
with the reference arm on the *same seeds* (same prompts and sampling randomness): a Student t
interval, an exact sign-flip test, an equivalence test (TOST) against a margin, a per-prompt
comparison and the seeds a decision would need. Below 6 paired seeds it says it cannot decide. The
conclusion lines are computed from those numbers, never written in advance.

Inputs (any mix): a run folder (metrics.jsonl, config.yaml, summary.json when it ended) or a
compare folder (compare.json + runs/<arm_slug>/seed-<seed>/). Outputs in one folder:
report.html (self-contained), report.md (+ the PNG files), report.json (the numbers).

load.py (reading runs), stats.py (typed numbers and the conclusion), inference.py (intervals,
tests, power), prompts.py (the per-prompt comparison), plots.py, render.py (the documents and
``build_report``).

Imports: ``fp16rl.measure`` and every row below it (pyproject.toml [tool.importlinter]), in practice
runs, config and core; not its siblings training, probe and tools; never torch, transformers or peft
(a report is built from files, on any machine).
"""

from fp16rl.report.load import Inputs, Run, arm_label, load_inputs
from fp16rl.report.plots import moving_average
from fp16rl.report.render import build_report
from fp16rl.report.inference import sign_flip_p, t_interval, tost
from fp16rl.report.stats import Analysis, analyse

__all__ = ["Analysis", "Inputs", "Run", "analyse", "arm_label", "build_report", "load_inputs", "moving_average",
           "sign_flip_p", "t_interval", "tost"]
