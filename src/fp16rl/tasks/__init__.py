"""Workloads: a task gives the prompts of a step and scores completions (see ``base.Task``)."""

from __future__ import annotations

from fp16rl.config import ConfigError, TrainConfig
from fp16rl.tasks.base import Task


def make_task(config: TrainConfig, tokenizer) -> Task:
    """The task named by ``--dataset-path``: ``toy:<name>`` for built-in toys, anything else is ARC data."""
    if config.dataset_path.startswith("toy:"):
        from fp16rl.tasks.toy import TOY_TASKS, DigitsTask

        name = config.dataset_path.removeprefix("toy:")
        if name not in TOY_TASKS:
            raise ConfigError(f"unknown toy task {name!r} in --dataset-path (available: {', '.join(TOY_TASKS)})")
        return DigitsTask(tokenizer, seed=config.seed)
    from fp16rl.tasks.arc.reward import DEFAULT_REWARD
    from fp16rl.tasks.arc.task import ArcTask

    try:
        return ArcTask(
            config.dataset_path,
            tokenizer,
            encoder=config.grid_encoder,
            augment=config.use_data_augmentation,
            seed=config.seed,
            prompts_per_step=config.prompts_per_step,
            reward_name=config.reward_name or DEFAULT_REWARD,
            n_jobs=config.n_jobs,
            timeout_s=config.code_timeout,
            memory_limit_mb=config.code_memory_limit_mb,
            max_prompt_tokens=config.max_seq_length - config.max_completion_length,
            skip_invalid=config.skip_invalid_tasks,
        )
    except ValueError as err:  # DatasetError is a ValueError too; both are user input problems
        raise ConfigError(str(err)) from None
