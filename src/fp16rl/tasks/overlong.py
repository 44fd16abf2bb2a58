"""The ``soft_overlong_punishment`` reward: TRL 1.16's ``get_soft_overlong_punishment`` (DAPO's Eq. 13).

With ``L_max = max_completion_len``, ``L_cache = soft_punish_cache`` and ``|y|`` the completion's token count::

    R(y) = 0                                   if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
         = -1                                  if |y| > L_max

so a completion is never rewarded for being short, and loses up to 1 linearly over the last ``L_cache``
tokens before ``L_max`` (``L_cache = 0``: no soft zone, -1 past ``L_max``). The same comparisons in the same
order as TRL's ``_SoftOverlongPunishment``, so the values are TRL's exactly.

On the command line and in YAML the reward is named ``soft_overlong_punishment``; its two parameters are
``--overlong-max-completion-len`` (default: ``--max-completion-length``, where a truncated completion scores
-1 exactly) and ``--overlong-soft-punish-cache`` (default: a fifth of ``L_max``, the ratio of DAPO's
20480/4096 and of ``trl grpo``'s 1280/256). A TRL config's ``reward_funcs: [get_soft_overlong_punishment]``
is ``trl grpo``'s registry entry, ``get_soft_overlong_punishment(1280, 256)``.
"""

from __future__ import annotations

from typing import Any, Sequence


class SoftOverlongPunishment:
    """The reward function; a class rather than a closure so that it pickles, as TRL's."""

    __name__ = "soft_overlong_punishment_reward"  # TRL's name: its metrics are reward/<this>/mean and /std

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        """One penalty in [-1, 0] per completion, from its token count (the module docstring's formula)."""
        start = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                rewards.append(0.0)
            elif length <= self.max_completion_len:
                rewards.append((start - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    def __repr__(self) -> str:
        return f"get_soft_overlong_punishment({self.max_completion_len}, {self.soft_punish_cache})"


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """TRL's factory, same name and arguments: the reward of the module docstring."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


def soft_overlong_from_config(config: Any) -> SoftOverlongPunishment:
    """The built-in ``soft_overlong_punishment`` with a run's parameters (``config``: a ``TrainConfig``):
    ``L_max`` = ``overlong_max_completion_len`` or ``max_completion_length``; ``L_cache`` =
    ``overlong_soft_punish_cache`` or ``L_max // 5``."""
    max_len = config.overlong_max_completion_len or config.max_completion_length
    cache = config.overlong_soft_punish_cache
    return SoftOverlongPunishment(max_len, max_len // 5 if cache is None else cache)
