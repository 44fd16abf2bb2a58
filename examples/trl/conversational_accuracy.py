# TRL's GRPOTrainer quickstart as TRL 1.16 writes it: conversational prompts (DeepMath-103K's format: a list of
# messages and a `solution` column) scored by trl.rewards' accuracy_reward, here with think_format_reward
# beside it, with `from trl import GRPOTrainer` changed to `from fp16rl`. Other changes, each marked: a local
# dataset file, the local model (FP16RL_EXAMPLE_MODEL, default smollm2-135m), a run small enough for 2 CPU cores.
import os
from pathlib import Path

from datasets import load_dataset
from fp16rl import GRPOConfig, GRPOTrainer  # was: from trl import GRPOTrainer
from trl.rewards import accuracy_reward, think_format_reward

data = Path(__file__).parent / "data" / "deepmath.jsonl"
dataset = load_dataset("json", data_files=str(data), split="train")  # was: load_dataset("trl-lib/DeepMath-103K", ...)

trainer = GRPOTrainer(
    model=os.environ.get("FP16RL_EXAMPLE_MODEL", "smollm2-135m"),  # was: "Qwen/Qwen2-0.5B-Instruct"
    reward_funcs=[accuracy_reward, think_format_reward],
    train_dataset=dataset,
    # small: 2 steps of 1 prompt x 4 completions of <= 32 tokens, float32 (TRL's defaults: bf16, 8 x 512)
    args=GRPOConfig(output_dir="SmolLM2-135M-GRPO-DeepMath", max_steps=2, per_device_train_batch_size=4,
                    num_generations=4, max_completion_length=32, bf16=False),
)
trainer.train()
