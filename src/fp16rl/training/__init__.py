"""``fp16rl train``: the RL loop and everything a run needs around it.

trainer.py        ``Trainer``: set-up, the RL step (grpo | ppo | online_dpo), the loop, checkpoints
loss_batches.py   what each algorithm's loss needs of a generation batch (advantages, values, pairs)
outcomes.py       the ``reward/*`` and ``completion/*`` metrics of a generation batch
plan.py           the preflight every entry point shares, before torch loads (``plan_run``, ``check_ranks``)
checkpoint_io.py  the torch state of a checkpoint, written and read back; global generators seeded
trackers.py       ``RunTracker``: metrics.jsonl and samples/ written, mirrored to the ``--report-to`` backends
monitor.py        ``CollapseMonitor``: the documented collapse rules over the step metrics
interrupt.py      Ctrl-C/SIGTERM: stop at the next safe point with a checkpoint

Imports: ``fp16rl.measure`` and every row below it (pyproject.toml [tool.importlinter]); not its
siblings probe, report and tools.
"""
