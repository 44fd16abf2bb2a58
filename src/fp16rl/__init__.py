"""fp16rl: RL fine-tuning of language models with the sampler and trainer in one verified precision.

``from fp16rl import TrainConfig, train`` is the Python API (see ``fp16rl.api``);
``from fp16rl import GRPOTrainer, GRPOConfig`` is TRL's (see ``fp16rl.trl_api``). The names resolve on
first use, so ``import fp16rl`` and the command line start without torch.
"""

from importlib import metadata
from typing import Any

__version__ = metadata.version("fp16rl")
__all__ = ["TrainConfig", "train", "GRPOTrainer", "GRPOConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":
        from fp16rl.config.options import TrainConfig

        return TrainConfig
    if name == "train":
        from fp16rl.api import train

        return train
    if name in ("GRPOTrainer", "GRPOConfig"):
        from fp16rl import trl_api

        return getattr(trl_api, name)
    raise AttributeError(f"module 'fp16rl' has no attribute {name!r}")
