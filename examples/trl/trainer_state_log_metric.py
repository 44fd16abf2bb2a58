# A custom reward in TRL 1.16's convention that reads `trainer_state` (a curriculum: the target length grows
# with training progress, as TRL's docs suggest it for) and reports through `log_metric` and `log_extra`,
# with `from trl` changed to `from fp16rl`. Other changes, each marked: a local dataset file, the local
# model (FP16RL_EXAMPLE_MODEL, default smollm2-135m), a run small enough for 2 CPU cores.
import os
from pathlib import Path

from datasets import load_dataset
from fp16rl import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

dataset = load_dataset("json", data_files=str(Path(__file__).parent / "data" / "tldr.jsonl"), split="train")


def curriculum_length_reward(completions, trainer_state, log_metric, log_extra, **kwargs):
    """Reward completions close to a target length that grows from 10 to 50 characters over the run."""
    progress = trainer_state.global_step / max(trainer_state.max_steps, 1)
    target = 10 + 40 * progress
    log_metric("curriculum/target_length", target)
    log_extra("length", [len(completion) for completion in completions])
    return [-abs(target - len(completion)) / target for completion in completions]


training_args = GRPOConfig(
    output_dir="SmolLM2-135M-GRPO-curriculum",
    # small: 3 steps of 1 prompt x 4 completions of <= 32 tokens, float32 (TRL's defaults: bf16, 8 x 512)
    max_steps=3, per_device_train_batch_size=4, num_generations=4, max_completion_length=32, bf16=False,
    logging_steps=1,
)
trainer = GRPOTrainer(
    model=os.environ.get("FP16RL_EXAMPLE_MODEL", "smollm2-135m"),  # was: "Qwen/Qwen2-0.5B-Instruct"
    reward_funcs=curriculum_length_reward,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
