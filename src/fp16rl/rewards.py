"""The built-in reward functions, importable as TRL's ``trl.rewards`` are::

    from fp16rl.rewards import math_reward, math_format_reward, reasoning_gym, get_soft_overlong_punishment

The public import path of what ``fp16rl.tasks.rewards`` (the reward registry, in the tasks layer) defines.
"""

from fp16rl.tasks.rewards import (RewardError, RewardSet, get_soft_overlong_punishment, load_reward_function,
                                  math_format_reward, math_reward, reasoning_gym)

__all__ = ["math_reward", "math_format_reward", "reasoning_gym", "get_soft_overlong_punishment", "RewardSet",
           "RewardError", "load_reward_function"]
