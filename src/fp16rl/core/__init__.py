"""The bottom layer: what every package shares, torch-free and with no other fp16rl import.

errors.py   UserError and ConfigError: bad input of any kind is one ``error:`` line, exit code 2
atomic.py   atomic, durable (fsync'ed) writes of files and folders
paths.py    $FP16RL_HOME and model folders, checked without loading anything heavy
seeds.py    every seed of a run derived from ``--seed`` by hashing (step seeds, sampling keys)
ranks.py    this process's rank, read from the launcher's environment (torchrun, accelerate)
scores.py   ``Scores``: the rewards of a batch of completions, as a task returns and the ranks gather them

Imports: nothing from fp16rl (the lowest row of the layer contract, pyproject.toml [tool.importlinter]);
never torch, transformers or peft (the "light" contract: the CLI uses it before torch loads).
"""
