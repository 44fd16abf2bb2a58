"""The smaller commands and helpers around training: export, model zoo, dataset filter, warm starts.

export.py       ``fp16rl export``: a checkpoint as a Hugging Face model folder or peft adapter
zoo.py          known real models prepared offline (``fp16rl models prepare``)
perfectible.py  ``fp16rl data perfectible``: keep the problems a model solves within a pass-rate band
sft.py          a short supervised warm start, so a tiny model writes runnable code before RL
arc_lite.py     the arc-lite warm model: the tiny model warm-started on synthetic ARC tasks, cached

Imports: ``fp16rl.measure`` and every row below it (pyproject.toml [tool.importlinter]); not its
siblings training, probe and report.
"""
