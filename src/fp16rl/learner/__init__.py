"""The trainer engine: its forward, logprobs and weights, and how it runs over several ranks.

logprobs.py        per-token logprobs and entropy: backbone once, ``LogitHead`` in chunks, fp32 log_softmax
prompt_forward.py  the backbone's forward with each prompt computed once for its completions, length buckets
weights.py         ``MasterWeights`` (FP32 masters + compute copy), AdamW and the LR schedule
critic.py          PPO's value model: a value head on the policy's backbone (own adapter or a copy)
reference.py       ``ReferencePolicy``: the KL penalty's and online DPO's reference
distributed.py     data parallel: prompt ownership, the gathered whole batch, exact reductions, DDP
fsdp.py            ``--fsdp``: FSDP2 sharding of full fine-tuning

Imports: ``fp16rl.model``, ``fp16rl.sandbox``, ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows
below it in pyproject.toml [tool.importlinter]); not its siblings algo, rollout and tasks.
"""
