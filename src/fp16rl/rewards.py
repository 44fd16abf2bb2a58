"""Reward functions in TRL's convention, so users bring theirs unchanged.

A reward function is ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are strings, or lists of chat messages when the dataset's prompts
are conversational (a completion is then ``[{"role": "assistant", "content": text}]``);
``completion_ids`` are the token ids; every other dataset column comes as a keyword argument (one
value per completion). ``None`` means "not applicable to this row". Several functions combine as
TRL combines them: ``reward = sum_f w_f * r_f``, a ``None`` counting as 0 (``nansum``), and each
function's mean over the rows it scored is logged as ``reward/<name>/mean``.

Functions are named ``module:function``, ``path/to/file.py:function`` or a built-in name (``math``,
``math_format``); a Python caller can pass callables. A function that raises, returns the wrong
number of values or a non-number is a user error naming the function and the row; with
``on_error="zero"`` the row scores 0 instead and is counted in ``reward/<name>/errors``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fp16rl.errors import ConfigError, UserError
from fp16rl.tasks.base import Scores

RewardFn = Callable[..., Sequence[Any]]
BUILTIN_REWARDS = ("math", "math_format", "reasoning_gym")


class RewardError(UserError):
    """A reward function that failed on the rows it was given."""


def builtin_reward(name: str) -> RewardFn:
    from fp16rl.tasks import gym
    from fp16rl.tasks import math as math_rewards

    return {"math": math_rewards.math_reward, "math_format": math_rewards.math_format_reward,
            "reasoning_gym": gym.reasoning_gym}[name]


def load_reward_function(spec: str) -> RewardFn:
    """A built-in name, ``module:function`` or ``path/to/file.py:function``, imported and checked."""
    if spec in BUILTIN_REWARDS:
        return builtin_reward(spec)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ConfigError(f"reward function {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}), "
                          "module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward function {spec!r}: file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"fp16rl_user_rewards.{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as err:  # an import can fail in any way the user's code does
        raise ConfigError(f"reward function {spec!r}: cannot import {target}: {type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward function {spec!r}: {target} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {attr!r} is not callable")
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@dataclass
class RewardSet:
    """The reward functions of a run, their weights and what to do when one fails."""

    functions: list[RewardFn]
    weights: list[float]
    names: list[str]
    on_error: str = "fail"  # fail | zero

    @classmethod
    def build(cls, functions: Sequence[str | RewardFn], weights: Sequence[float] = (),
              on_error: str = "fail") -> "RewardSet":
        if not functions:
            raise ConfigError("no reward function: pass --reward-funcs (or --reward-name for one)")
        loaded = [load_reward_function(f) if isinstance(f, str) else f for f in functions]
        for original, fn in zip(functions, loaded):
            if not callable(fn):
                raise ConfigError(f"reward function {original!r} is not callable")
        if weights and len(weights) != len(loaded):
            raise ConfigError(f"--reward-weights has {len(weights)} values for {len(loaded)} reward functions")
        names = []
        for fn in loaded:
            base = name = reward_name(fn)
            index = 2
            while name in names:
                name, index = f"{base}_{index}", index + 1
            names.append(name)
        return cls(loaded, [float(w) for w in weights] or [1.0] * len(loaded), names, on_error)

    def check(self, prompt: Any, columns: dict[str, Any], conversational: bool, row: int = 0) -> None:
        """Call every function once on a dataset row with an empty completion, before a run starts: a
        missing keyword, a wrong return type or length fails here, not after the first step's sampling.
        (Any completion can be empty, so a reward function must score one.)"""
        completion = [{"role": "assistant", "content": ""}] if conversational else ""
        self([prompt], [completion], [[]], {name: [value] for name, value in columns.items()}, [row])

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: dict[str, list[Any]], rows: Sequence[int]) -> Scores:
        """Combined reward per completion; each function's values as a component (NaN where it returned
        None: ``reward/<name>/mean`` is over the rows it scored) and its error count.

        ``rows`` are the dataset rows of the completions, for messages that name the failing row.
        """
        combined = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        counts: dict[str, float] = {}
        for fn, weight, name in zip(self.functions, self.weights, self.names):
            values, errors = self._call(fn, name, prompts, completions, completion_ids, columns, rows)
            components[name] = [math.nan if v is None else v for v in values]
            if self.on_error == "zero":
                counts[f"reward/{name}/errors"] = float(errors)
            for i, value in enumerate(values):
                if value is not None:
                    combined[i] += weight * value
        return Scores(rewards=combined, components=components, counts=counts)

    def _call(self, fn: RewardFn, name: str, prompts: list[Any], completions: list[Any],
              completion_ids: list[list[int]], columns: dict[str, list[Any]],
              rows: Sequence[int]) -> tuple[list[float | None], int]:
        try:
            values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        except Exception as err:  # the user's code: any exception is theirs to see, in one line
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err} "
                                  f"(on dataset rows {_rows_text(rows)})") from None
            return self._row_by_row(fn, prompts, completions, completion_ids, columns)
        if len(values) != len(completions):
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} returned {len(values)} values for "
                                  f"{len(completions)} completions (dataset rows {_rows_text(rows)})")
            return [0.0] * len(completions), len(completions)
        checked, errors = [], 0
        for i, value in enumerate(values):
            number = _number(value)
            if number is _INVALID:
                if self.on_error == "fail":
                    raise RewardError(f"reward function {name!r} returned {value!r} for dataset row {rows[i]} "
                                      f"(completion {i}); expected a finite number or None")
                number, errors = 0.0, errors + 1
            checked.append(number)
        return checked, errors

    def _row_by_row(self, fn: RewardFn, prompts: list[Any], completions: list[Any],
                    completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> tuple[list[float | None], int]:
        """``on_error="zero"`` after a raise: find the rows that raise; each of those scores 0."""
        values: list[float | None] = []
        errors = 0
        for i in range(len(completions)):
            try:
                (value,) = list(fn(prompts=[prompts[i]], completions=[completions[i]],
                                   completion_ids=[completion_ids[i]], **{k: [v[i]] for k, v in columns.items()}))
                number = _number(value)
            except Exception:
                number = _INVALID
            if number is _INVALID:
                number, errors = 0.0, errors + 1
            values.append(number)
        return values, errors


_INVALID = object()


def _number(value: Any) -> Any:
    """A finite float, None for "not applicable", or ``_INVALID`` (bools and NaN are not rewards)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return _INVALID
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _INVALID
    return number if math.isfinite(number) else _INVALID


def _rows_text(rows: Sequence[int]) -> str:
    unique = sorted(set(rows))
    return ", ".join(map(str, unique[:8])) + (" ..." if len(unique) > 8 else "")
