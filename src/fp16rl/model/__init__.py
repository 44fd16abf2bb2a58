"""A causal LM as both engines hold and run it: loading, the shared forward, the precision switch.

loading.py    models and tokenizers from local HF folders, LoRA through peft, 4-bit, the tiny-model factory
forward.py    what sampler and trainer share: TokenBatch, left padding and positions, the prefill pass,
              ``causal_lm``/``backbone``, ``dropout_active``, the attention and RoPE rules the fast paths assume
precision.py  PrecisionPolicy (dtypes, compute path, autocast, GradScaler) and DtypeRecorder, the audit
hardware.py   this machine: measured half-precision speed, CPU threads, the allocator setting

Imports: ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows below it in pyproject.toml
[tool.importlinter]); not its sibling ``fp16rl.sandbox``.
"""
