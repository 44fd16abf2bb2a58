# train_grpo.py: TRL's GRPOTrainer quickstart (a length reward on TL;DR prompts), with `from trl` changed to
# `from fp16rl`. Other changes, each marked: a local dataset file (nothing is downloaded), the local model
# (FP16RL_EXAMPLE_MODEL, default the prepared smollm2-135m), and a run small enough for 2 CPU cores.
import os
from pathlib import Path

from datasets import load_dataset
from fp16rl import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

data = Path(__file__).parent / "data" / "tldr.jsonl"
dataset = load_dataset("json", data_files=str(data), split="train")  # was: load_dataset("trl-lib/tldr", split="train")


# Define the reward function, which rewards completions that are close to 20 characters
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


training_args = GRPOConfig(
    output_dir="SmolLM2-135M-GRPO",  # was: "Qwen2-0.5B-GRPO"
    logging_steps=10,
    # small: 2 steps of 1 prompt x 4 completions of <= 32 tokens, float32 (TRL's defaults: bf16, 8 x 512)
    max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=32, bf16=False,
)
trainer = GRPOTrainer(
    model=os.environ.get("FP16RL_EXAMPLE_MODEL", "smollm2-135m"),  # was: "Qwen/Qwen2-0.5B-Instruct"
    reward_funcs=reward_len,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
