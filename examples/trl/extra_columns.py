# TRL's GRPOTrainer documentation, "Using a custom reward function": example 3 (a reward from the dataset's
# `ground_truth` column) and example 4 (a multi-task dataset whose `task` column says which function applies;
# the other returns None), with `from trl` changed to `from fp16rl`. Other changes, each marked: a local
# dataset file, the local model (FP16RL_EXAMPLE_MODEL, default smollm2-135m), a run small enough for 2 CPU cores.
import os
import re
from pathlib import Path

from datasets import load_dataset
from fp16rl import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

# columns: prompt, ground_truth, task ("math" or "format")
dataset = load_dataset("json", data_files=str(Path(__file__).parent / "data" / "math_tasks.jsonl"), split="train")


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


# Format-task reward: applies only to the rows of task "format" (None for the others, as in example 4)
def format_reward_func(completions, task, **kwargs):
    return [(1.0 if "\\boxed{" in c else -1.0) if t == "format" else None for c, t in zip(completions, task)]


training_args = GRPOConfig(
    output_dir="SmolLM2-135M-GRPO-columns",
    # small: 2 steps of 1 prompt x 4 completions of <= 32 tokens, float32 (TRL's defaults: bf16, 8 x 512)
    max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=32, bf16=False,
)
trainer = GRPOTrainer(
    model=os.environ.get("FP16RL_EXAMPLE_MODEL", "smollm2-135m"),  # was: "Qwen/Qwen2-0.5B-Instruct"
    reward_funcs=[reward_func, format_reward_func],
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
