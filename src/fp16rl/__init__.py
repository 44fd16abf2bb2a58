"""fp16rl: GRPO-family RL fine-tuning with the sampler and trainer in one verified precision."""

__version__ = "0.1.0"
