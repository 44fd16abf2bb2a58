"""The RL algorithms by ``--algorithm`` name. Adding one: a module with an ``Algorithm`` subclass
(``algorithm.py`` is the interface) and its line here; its name goes into ``fp16rl.config.options.ALGORITHMS``
(the options are checked before torch loads), which tests/test_algorithms.py holds equal to these keys."""

from __future__ import annotations

from fp16rl.config.options import TrainConfig
from fp16rl.training.algorithm import Algorithm
from fp16rl.training.dpo_step import OnlineDpo
from fp16rl.training.grpo_step import Grpo
from fp16rl.training.ppo_step import Ppo

ALGORITHMS: dict[str, type[Algorithm]] = {
    "grpo": Grpo,
    "ppo": Ppo,
    "online_dpo": OnlineDpo,
}


def make_algorithm(config: TrainConfig) -> Algorithm:
    """The algorithm ``config.algorithm`` names (``TrainConfig.validate`` has checked the name)."""
    return ALGORITHMS[config.algorithm](config)
