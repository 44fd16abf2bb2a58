"""Helpers shared by test modules (importable: pyproject puts tests/ on the path)."""

from pathlib import Path

from fp16rl.config import TrainConfig


def toy_config(out: Path, **overrides) -> TrainConfig:
    options = dict(
        model_path="tiny", dataset_path="toy:digits", output_dir=str(out), dtype="float32", lora_r=0,
        learning_rate=2e-3, num_generations=8, prompts_per_step=4, max_completion_length=24, max_seq_length=256,
        beta=0.0, max_grad_norm=1.0, warmup_ratio=0.0, max_steps=4, save_steps=100, save_samples_steps=2, top_p=1.0,
        mask_truncated_completions=False, seed=0,
    )
    options.update(overrides)
    return TrainConfig(**options)
