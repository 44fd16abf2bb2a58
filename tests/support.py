"""Helpers shared by test modules (importable: pyproject puts tests/ on the path)."""

from pathlib import Path
from typing import Callable

from fp16rl.config.options import TrainConfig


def toy_config(out: Path, **overrides) -> TrainConfig:
    options = dict(
        model_path="tiny", dataset_path="toy:digits", output_dir=str(out), dtype="float32", lora_r=0,
        learning_rate=2e-3, num_generations=8, prompts_per_step=4, max_completion_length=24, max_seq_length=256,
        beta=0.0, max_grad_norm=1.0, warmup_ratio=0.0, max_steps=4, save_steps=100, save_samples_steps=2, top_p=1.0,
        mask_truncated_completions=False, seed=0,
    )
    options.update(overrides)
    return TrainConfig(**options)


def assert_resume_is_exact(tmp_path: Path, make_config: Callable[..., TrainConfig], **options) -> None:
    """3 steps straight == 2 steps, then a resumed third: every logged metric but timings, bit for bit."""
    from fp16rl.runs.tracking import read_metrics
    from fp16rl.training.trainer import Trainer

    Trainer(make_config(tmp_path / "straight", max_steps=3, **options)).train(show_progress=False)
    Trainer(make_config(tmp_path / "split", max_steps=2, **options)).train(show_progress=False)
    resumed = Trainer(make_config(tmp_path / "split", max_steps=3, resume=True, **options))
    assert resumed.start_step == 2
    resumed.train(show_progress=False)

    def comparable(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    straight, split = comparable("straight"), comparable("split")
    assert [r["step"] for r in split] == [1, 2, 3]
    assert straight == split


def assert_toy_reward_rises(run_dir: Path) -> list[dict]:
    """The toy task's learning check shared by the algorithms' slow tests (the thresholds of GRPO's
    tests/test_trainer.py::test_toy_reward_rises): the mean reward of the last 5 of 25 steps is above 0.4
    and 3x the first 5's, which are below 0.15. Returns the step records."""
    from fp16rl.runs.tracking import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > 0.4 and last > 3 * first, rewards
    return records
