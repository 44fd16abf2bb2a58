"""The measurement at the heart of fp16rl, shared by the training step and the probe.

rollouts.py  ``measure_rollouts``: sample (mu) then recompute the same tokens in the trainer's
             compute path (pi_old); ``trainer_logprobs``
pi_old.py    pi_old from the recompute or from the training forward, and the step's telemetry
             (mismatch and sampling metrics, IS weights)

Imports: ``fp16rl.algo``, ``fp16rl.rollout``, ``fp16rl.learner``, ``fp16rl.tasks`` and every row below them
(pyproject.toml [tool.importlinter]).
"""
