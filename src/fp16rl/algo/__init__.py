"""The RL algorithms as pure tensor functions: advantages, corrections, losses, the mismatch metrics.

batch.py      ``RolloutBatch``: the per-token tensors of one generation batch, what the losses take
grpo.py       GRPO-family group advantages, importance-sampling corrections (``Correction``), the clipped
              surrogate and its aggregations (grpo | bnpo | dapo | dr_grpo), GSPO
ppo.py        PPO: token-level rewards, GAE, whitening, the clipped policy and value losses
dpo.py        online DPO: chosen/rejected pairs from a group's rewards, the sigmoid and IPO losses
mismatch.py   ``mismatch_metrics`` (every ``mismatch/*`` formula) and ``sampling_metrics``

Imports: ``fp16rl.model``, ``fp16rl.sandbox``, ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows
below it in pyproject.toml [tool.importlinter]); not its siblings rollout, learner and tasks.
"""
