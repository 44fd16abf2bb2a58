"""The training options, without torch: what a run is asked to do, checked before anything loads.

* :mod:`.options`: :class:`TrainConfig` (every option with its default and help text), its
  validation, and the names of the choices options take (losses, rewards, grid encoders...), declared
  here so lower layers check them without importing the code behind them.
* :mod:`.parse`: flags, ``--config`` YAML files and a run's stored ``config.yaml`` into a validated
  :class:`TrainConfig` (:func:`parse_train_args`); the resume rules (which options a run keeps).
* :mod:`.dtypes`: the accepted precision spellings.
"""

from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import parse_train_args

__all__ = ["TrainConfig", "parse_train_args"]
