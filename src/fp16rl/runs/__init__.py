"""Run folders as files, torch-free: what a run writes and how it is read back.

folders.py    a folder in use is refused; config.yaml and metrics.jsonl read back; summary.json; arm folder names
reuse.py      a folder whose run ended before its first logged step, reused (only the names a run writes)
checkpoint.py checkpoint layout and SHA-256 manifest: listed, checked, pruned (tensors: ``fp16rl.training.checkpoint_io``)
tracking.py   metrics.jsonl read back (non-finite values included), final/best reward, the progress bar

Imports: ``fp16rl.config`` and ``fp16rl.core`` only (the rows below it in pyproject.toml
[tool.importlinter]); never torch, transformers or peft, so resume is checked before torch loads.
"""
