"""Reward functions in TRL's convention, so users bring theirs unchanged.

A reward function is ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are strings, or lists of chat messages when the dataset's prompts
are conversational (a completion is then ``[{"role": "assistant", "content": text}]``);
``completion_ids`` are the token ids; every other dataset column comes as a keyword argument (one
value per completion). ``None`` means "not applicable to this row". Several functions combine as
TRL combines them: ``reward = sum_f w_f * r_f``, a ``None`` counting as 0 (``nansum``), and each
function's mean over the rows it scored is logged as ``reward/<name>/mean``.

Functions are named ``module:function``, ``path/to/file.py:function`` or a built-in name (``math``,
``math_format``, ``reasoning_gym``); a Python caller can pass callables, the built-ins included, as
``trl.rewards`` offers TRL's::

    from fp16rl.rewards import math_reward, math_format_reward

    train(config, dataset=rows, reward_funcs=[math_reward, math_format_reward])

``math_reward`` pays 1.0 for a stated final answer (``\\boxed{}``, "The answer is ...", ``#### ...``
or a lone number on the last line) equal to the ``answer`` (or ``solution``) column by math-verify,
never for restating the question's arithmetic; ``math_format_reward`` pays 1.0 for exactly one
``\\boxed{}``; ``reasoning_gym`` is reasoning-gym's verifier on a ``gym_entry`` column
(:mod:`fp16rl.tasks.math` and :mod:`fp16rl.tasks.gym` hold the details).

A function that raises, returns the wrong number of values or a non-number is a user error naming
the function and the row; with ``on_error="zero"`` the row scores 0 instead and is counted in
``reward/<name>/errors``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fp16rl.config.options import BUILTIN_REWARDS
from fp16rl.core.errors import ConfigError, UserError
from fp16rl.core.scores import Scores
from fp16rl.tasks.gym import reasoning_gym
from fp16rl.tasks.math import math_format_reward, math_reward

__all__ = ["math_reward", "math_format_reward", "reasoning_gym", "RewardSet", "RewardError", "load_reward_function"]

logger = logging.getLogger("fp16rl")
RewardFn = Callable[..., Sequence[Any]]


class RewardError(UserError):
    """A reward function that failed on the rows it was given."""


def builtin_reward(name: str) -> RewardFn:
    return {"math": math_reward, "math_format": math_format_reward, "reasoning_gym": reasoning_gym}[name]


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
    _warned: set[str] = field(default_factory=set, init=False, repr=False, compare=False)  # warnings given

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
        (Any completion can be empty, so a reward function must score one.) Warns of nothing: an empty
        completion may well be "not applicable"."""
        completion = [{"role": "assistant", "content": ""}] if conversational else ""
        self._score([prompt], [completion], [[]], {name: [value] for name, value in columns.items()}, [row])

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: dict[str, list[Any]], rows: Sequence[int]) -> Scores:
        """Combined reward per completion; each function's values as a component (NaN where it returned
        None: ``reward/<name>/mean`` is over the rows it scored) and its error count.

        ``rows`` are the dataset rows of the completions, for messages that name the failing row. What
        would otherwise pass silently is said once per run on the console (see :meth:`_warn_none`,
        :meth:`_warn_failures`)."""
        scores, failures = self._score(prompts, completions, completion_ids, columns, rows)
        self._warn_none(scores, rows)
        for name, failure in failures.items():
            self._warn_failures(name, failure, len(completions))
        return scores

    def _score(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
               columns: dict[str, list[Any]], rows: Sequence[int]) -> tuple[Scores, dict[str, Failures]]:
        combined = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        counts: dict[str, float] = {}
        failures: dict[str, Failures] = {}
        for fn, weight, name in zip(self.functions, self.weights, self.names):
            values, failure = self._call(fn, name, prompts, completions, completion_ids, columns, rows)
            components[name] = [math.nan if v is None else v for v in values]
            if self.on_error == "zero":
                counts[f"reward/{name}/errors"] = float(failure.count)
            if failure.count:
                failures[name] = failure
            for i, value in enumerate(values):
                if value is not None:
                    combined[i] += weight * value
        return Scores(rewards=combined, components=components, counts=counts), failures

    def _warn_none(self, scores: Scores, rows: Sequence[int]) -> None:
        """TRL warns when every reward function returned None for a row: the row then scores 0 without a
        word. Said once for the first such row, and once more the first time it is every row of a step
        (then the step's advantages are all 0 and it learns nothing)."""
        unscored = [i for i in range(len(scores.rewards))
                    if all(math.isnan(values[i]) for values in scores.components.values())]
        every = bool(unscored) and len(unscored) == len(scores.rewards)
        key = "none:all" if every else "none:row"
        if not unscored or key in self._warned or (not every and "none:all" in self._warned):
            return
        self._warned.update({key, "none:row"})
        functions = "the reward function" if len(self.names) == 1 else "all reward functions"
        where = (f"all {len(unscored)} completions of this step (dataset rows {_rows_text(rows)})" if every
                 else f"dataset row {rows[unscored[0]]} (completion {unscored[0]})")
        consequence = "they all score 0 and the step learns nothing" if every else "it scores 0"
        logger.warning(f"{functions} ({', '.join(self.names)}) returned None for {where}: {consequence}; make at "
                       "least one reward function return a number for every row (None means not applicable)")

    def _warn_failures(self, name: str, failure: Failures, batch: int) -> None:
        """``on_error="zero"`` turns a failing function into silent zeros: say so the first time it fails,
        and loudly the first time it fails on every completion of a step (it then teaches nothing)."""
        every = failure.count == batch
        key = f"errors:{name}:{'all' if every else 'some'}"
        if key in self._warned or (not every and f"errors:{name}:all" in self._warned):
            return
        self._warned.update({key, f"errors:{name}:some"})
        what = (f"failed on all {batch} completions of this step" if every
                else f"failed on {failure.count} of {batch} completions of this step")
        later = "" if every else " (a step where it fails on every completion is said once more)"
        logger.warning(f"reward function {name!r} {what} (first: dataset row {failure.first_row}: {failure.first}); "
                       f"--reward-on-error zero scores them 0{' so it teaches nothing' if every else ''}; later "
                       f"failures are counted in reward/{name}/errors{later}")

    def _call(self, fn: RewardFn, name: str, prompts: list[Any], completions: list[Any],
              completion_ids: list[list[int]], columns: dict[str, list[Any]],
              rows: Sequence[int]) -> tuple[list[float | None], Failures]:
        try:
            values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        except Exception as err:  # the user's code: any exception is theirs to see, in one line
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err} "
                                  f"(on dataset rows {_rows_text(rows)})") from None
            return self._row_by_row(fn, prompts, completions, completion_ids, columns, rows)
        if len(values) != len(completions):
            problem = f"returned {len(values)} values for {len(completions)} completions"
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} {problem} (dataset rows {_rows_text(rows)})")
            return [0.0] * len(completions), Failures(len(completions), problem, rows[0])
        checked: list[float | None] = []
        failure = Failures()
        for i, value in enumerate(values):
            number = _number(value)
            if number is _INVALID:
                if self.on_error == "fail":
                    raise RewardError(f"reward function {name!r} returned {value!r} for dataset row {rows[i]} "
                                      f"(completion {i}); expected a finite number or None")
                number = 0.0
                failure.add(f"returned {value!r}, expected a finite number or None", rows[i])
            checked.append(number)
        return checked, failure

    def _row_by_row(self, fn: RewardFn, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                    columns: dict[str, list[Any]], rows: Sequence[int]) -> tuple[list[float | None], Failures]:
        """``on_error="zero"`` after a raise: find the rows that raise; each of those scores 0."""
        values: list[float | None] = []
        failure = Failures()
        for i in range(len(completions)):
            try:
                (value,) = list(fn(prompts=[prompts[i]], completions=[completions[i]],
                                   completion_ids=[completion_ids[i]], **{k: [v[i]] for k, v in columns.items()}))
                number = _number(value)
                problem = f"returned {value!r}, expected a finite number or None"
            except Exception as err:
                number, problem = _INVALID, f"{type(err).__name__}: {err}"
            if number is _INVALID:
                number = 0.0
                failure.add(problem, rows[i])
            values.append(number)
        return values, failure


@dataclass
class Failures:
    """How many rows a reward function failed on in one call, and the first failure's message and row."""

    count: int = 0
    first: str = ""
    first_row: int = -1

    def add(self, problem: str, row: int) -> None:
        if not self.count:
            self.first, self.first_row = problem, row
        self.count += 1


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
