"""The Python API: ``from fp16rl import TrainConfig, train``.

    from fp16rl import TrainConfig, train

    def correct(completions, answer, **kwargs):          # TRL's reward convention
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    metrics = train(TrainConfig(model_path="tiny", output_dir="runs/api", max_steps=20),
                    dataset=[{"prompt": "2 + 2 =", "answer": "4"}, ...], reward_funcs=[correct])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from fp16rl.config.options import TrainConfig


def train(config: TrainConfig, dataset: Any = None, reward_funcs: Sequence[str | Callable[..., Any]] | None = None,
          show_progress: bool = False) -> dict[str, float]:
    """Run one training run; return its last step's metrics (everything else is in ``config.output_dir``).

    ``dataset``: a ``datasets.Dataset`` or a list of dicts with a prompt column (``config.prompt_column``,
    default ``prompt``: text or chat messages) and any other columns, which reach the reward functions;
    None trains on what ``config.dataset_path`` names. ``reward_funcs``: callables in TRL 1.16's convention
    ``fn(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns) ->
    list[float | None]`` (sync or async; see ``fp16rl.tasks.reward_calls``), or their names (see
    ``--reward-funcs``); weights from ``config.reward_weights``. Bad input raises a
    ``fp16rl.core.errors.UserError`` with the message the CLI would print, before anything is written.
    """
    from fp16rl.training.trainer import Trainer

    trainer = Trainer(config, dataset=dataset, reward_funcs=reward_funcs)
    return trainer.train(show_progress=show_progress)
