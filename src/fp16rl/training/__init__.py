"""``fp16rl train``: the RL loop and everything a run needs around it.

Named ``training``, not ``train``: a subpackage ``fp16rl.train`` would shadow the Python API's
``fp16rl.train()`` once imported.

trainer.py        ``Trainer``: the loop, ``Trainer.step`` (the same five phases for every algorithm), checkpoints
setup.py          what a rank builds before its first step: policy, FP32 masters, reference, sampler, optimizer
algorithm.py      ``Algorithm``, the interface of an RL algorithm: its loss batch, backward, metrics, hooks
algorithms.py     the algorithms by ``--algorithm`` name (the registry)
grpo_step.py      GRPO's part of the step: group advantages, the reference, the clipped surrogate
ppo_step.py       PPO's part: the critic, GAE, the clipped policy and value losses
dpo_step.py       online DPO's part: the pairs, their loss weights, the DPO loss's gradient
optimize.py       the optimizer passes over GA micro-batches and ``scaled_optimizer_step``
outcomes.py       the ``reward/*`` and ``completion/*`` metrics of a generation batch
completions.py    the completions table of a logged step: samples/ records and the trackers' table
plan.py           the preflight every entry point shares, before torch loads (``plan_run``, ``check_ranks``)
checkpoint_io.py  the torch state of a checkpoint, written and read back; global generators seeded
trackers.py       ``RunTracker``: metrics.jsonl and samples/ written, mirrored to the ``--report-to`` backends
monitor.py        ``CollapseMonitor``: the documented collapse rules over the step metrics
interrupt.py      Ctrl-C/SIGTERM: stop at the next safe point with a checkpoint

Imports: ``fp16rl.measure`` and every row below it (pyproject.toml [tool.importlinter]); not its
siblings probe, report and tools.
"""
