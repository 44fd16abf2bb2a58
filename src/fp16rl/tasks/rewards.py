"""Reward functions in TRL's convention, so users bring theirs unchanged.

A reward function is called as TRL 1.16's GRPOTrainer calls it: ``fn(prompts=..., completions=...,
completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **columns)`` and returns one value
per completion. ``prompts`` and ``completions`` are strings, or lists of chat messages when the dataset's
prompts are conversational (a completion is then ``[{"role": "assistant", "content": text}]``);
``completion_ids`` are the token ids; ``trainer_state`` is a ``transformers.TrainerState`` of the step
being scored; every other dataset column comes as a keyword argument (one value per completion), except
``completion`` and ``completion_ids``, which TRL drops. ``async`` functions are awaited, concurrently
(:mod:`fp16rl.tasks.reward_calls` has the calling convention, ``log_metric`` and ``log_extra``).

A value is a number (a bool counts 1 or 0), or ``None`` or NaN for "not applicable to this row". Several
functions combine as TRL combines them: ``reward = sum_f w_f * r_f``, a ``None``/NaN counting as 0
(``nansum``), and each function's mean and sample std over the rows it scored are logged as
``reward/<name>/mean`` and ``reward/<name>/std`` (TRL's ``nanmean``, ``nanstd``).
No function is called before the first real batch (a reward may count its calls or assume whole
groups); before the run starts each one's signature is checked against the keywords it will get.

Functions are named ``module:function``, ``path/to/file.py:function``, a built-in name (``math``,
``math_format``, ``reasoning_gym``, ``soft_overlong_punishment``) or the folder of a sequence-classification
reward model (scored as TRL scores one: logit 0, :mod:`fp16rl.tasks.reward_model`); a Python caller can pass
callables, the built-ins included, as ``trl.rewards`` offers TRL's::

    from fp16rl.rewards import math_reward, math_format_reward

    train(config, dataset=rows, reward_funcs=[math_reward, math_format_reward])

``math_reward`` pays 1.0 for a stated final answer (``\\boxed{}``, "The answer is ...", ``#### ...``
or a lone number on the last line) equal to the ``answer`` (or ``solution``) column by math-verify,
never for restating the question's arithmetic; ``math_format_reward`` pays 1.0 for exactly one
``\\boxed{}``; ``reasoning_gym`` is reasoning-gym's verifier on a ``gym_entry`` column
(:mod:`fp16rl.tasks.math` and :mod:`fp16rl.tasks.gym` hold the details); ``soft_overlong_punishment`` is TRL's
``get_soft_overlong_punishment`` (DAPO's length penalty, parameters ``--overlong-max-completion-len`` and
``--overlong-soft-punish-cache``: :mod:`fp16rl.tasks.overlong`).

A function that raises, returns the wrong number of values, a non-number or an infinity is a user error
naming the function and the row; with ``on_error="zero"`` the row scores 0 instead and is counted in
``reward/<name>/errors``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fp16rl.config.options import BUILTIN_REWARDS, TrainConfig
from fp16rl.core.errors import ConfigError, UserError
from fp16rl.core.scores import Scores
from fp16rl.tasks.gym import reasoning_gym
from fp16rl.tasks.math import math_format_reward, math_reward
from fp16rl.tasks.overlong import get_soft_overlong_punishment, soft_overlong_from_config
from fp16rl.tasks.reward_calls import (CALL_KEYWORDS, CallLogs, EventLoop, RewardBatch, StepLogs, is_async_callable,
                                       trainer_state)
from fp16rl.tasks.reward_model import RewardModel, is_model_folder

__all__ = ["math_reward", "math_format_reward", "reasoning_gym", "get_soft_overlong_punishment", "RewardSet",
           "RewardError", "load_reward_function"]

logger = logging.getLogger("fp16rl")
RewardFn = Callable[..., Sequence[Any]]


class RewardError(UserError):
    """A reward function that failed on the rows it was given."""


def builtin_reward(name: str, config: Any = None) -> RewardFn:
    """The built-in reward function ``name`` (one of ``BUILTIN_REWARDS``, declared in config); ``config``
    (a ``TrainConfig``, None: the defaults) gives the parameters of those that take some."""
    return _builtin_functions()[name](config if config is not None else TrainConfig())


def _builtin_functions() -> dict[str, Callable[[Any], RewardFn]]:
    """Each built-in from the run's config (only ``soft_overlong_punishment`` reads it)."""
    return {"math": lambda config: math_reward, "math_format": lambda config: math_format_reward,
            "reasoning_gym": lambda config: reasoning_gym, "soft_overlong_punishment": soft_overlong_from_config}


def load_reward_function(spec: str, config: Any = None) -> RewardFn:
    """A built-in name (its parameters from ``config``), ``module:function``, ``path/to/file.py:function``, or
    the folder of a sequence-classification reward model (:class:`~fp16rl.tasks.reward_model.RewardModel`),
    imported and checked."""
    if spec in BUILTIN_REWARDS:
        return builtin_reward(spec, config)
    if is_model_folder(spec):
        return RewardModel(spec)
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
    _loop: EventLoop = field(default_factory=EventLoop, init=False, repr=False, compare=False)  # async functions

    @classmethod
    def build(cls, functions: Sequence[str | RewardFn], weights: Sequence[float] = (),
              on_error: str = "fail", config: Any = None) -> "RewardSet":
        """The functions (names loaded; ``config`` gives the built-ins' parameters), weighted, named uniquely."""
        if not functions:
            raise ConfigError("no reward function: pass --reward-funcs (or --reward-name for one)")
        loaded = [load_reward_function(f, config) if isinstance(f, str) else f for f in functions]
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

    def check_signatures(self, columns: Sequence[str]) -> None:
        """Refuse, before a run starts and without calling anything, a function that cannot take the keywords
        it will get (a required argument that no column provides, or a keyword it neither names nor takes
        as ``**kwargs``): its first call would fail the same way, after the model has loaded and sampled.
        Nothing else is tried before the first real batch: a reward may count its calls or assume groups."""
        keywords = dict.fromkeys([*CALL_KEYWORDS, *columns])
        for fn, name in zip(self.functions, self.names):
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):  # a builtin or C callable: its first call will tell
                continue
            try:
                signature.bind(**keywords)
            except TypeError as err:
                raise ConfigError(
                    f"reward function {name!r} cannot be called as TRL calls reward functions: {err}; it gets the "
                    f"keywords {', '.join(CALL_KEYWORDS)} and one per dataset column "
                    f"({', '.join(columns) or 'none'}): add **kwargs for those it does not use") from None

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: dict[str, list[Any]], rows: Sequence[int], state: Any = None) -> Scores:
        """Combined reward per completion; each function's values as a component (NaN where it returned
        None or NaN: ``reward/<name>/mean`` is over the rows it scored), its error count, and what the
        functions logged (``log_metric`` -> ``metrics``, ``log_extra`` -> ``details``).

        ``rows`` are the dataset rows of the completions, for messages that name the failing row; ``state``
        the ``trainer_state`` the functions get (None: one at step 0). What would otherwise pass silently
        is said once per run on the console (see :meth:`_warn_none`, :meth:`_warn_failures`)."""
        batch = RewardBatch(list(prompts), list(completions), [list(t) for t in completion_ids], dict(columns),
                            list(rows), trainer_state(None, 1) if state is None else state)
        scores, failures = self._score(batch)
        self._warn_none(scores, batch.rows)
        for name, failure in failures.items():
            self._warn_failures(name, failure, len(batch))
        return scores

    def close(self) -> None:
        """Stop the event loop of the async functions, if one was started."""
        self._loop.close()

    def _score(self, batch: RewardBatch) -> tuple[Scores, dict[str, Failures]]:
        combined = [0.0] * len(batch)
        components: dict[str, list[float]] = {}
        counts: dict[str, float] = {}
        failures: dict[str, Failures] = {}
        logs = StepLogs(len(batch))
        for fn, weight, name, outcome in zip(self.functions, self.weights, self.names, self._outcomes(batch)):
            values, failure = self._checked(fn, name, outcome, batch, logs)
            components[name] = [math.nan if v is None else v for v in values]
            if self.on_error == "zero":
                counts[f"reward/{name}/errors"] = float(failure.count)
            if failure.count:
                failures[name] = failure
            for i, value in enumerate(values):
                if value is not None:
                    combined[i] += weight * value
        return Scores(rewards=combined, components=components, counts=counts, metrics=logs.metrics(),
                      details=logs.details(), metric_sums=dict(logs.metric_sums)), failures

    def _outcomes(self, batch: RewardBatch) -> list[Outcome]:
        """Every function's result on ``batch`` (its values, or the exception it raised) and what it logged:
        the synchronous functions one after another, then the async ones concurrently, as TRL runs them."""
        outcomes = [Outcome(CallLogs()) for _ in self.functions]
        waiting = [i for i, fn in enumerate(self.functions) if is_async_callable(fn)]
        for i, fn in enumerate(self.functions):
            if i not in waiting:
                outcomes[i].result = self._run(fn, batch.keywords(outcomes[i].logs))
        if waiting:
            calls = [_awaited(self.functions[i], batch.keywords(outcomes[i].logs)) for i in waiting]
            for i, result in zip(waiting, self._loop.gather(calls)):
                outcomes[i].result = _as_list(result)
        return outcomes

    def _run(self, fn: RewardFn, keywords: dict[str, Any]) -> list[Any] | Exception:
        """``fn``'s values as a list, or the exception the call raised; an awaitable it returns (an async
        function behind a plain wrapper) is awaited on the run's loop."""
        try:
            result = fn(**keywords)
        except Exception as err:  # the user's code: any exception is theirs to see, in one line
            return err
        if inspect.isawaitable(result):
            (result,) = self._loop.gather([result])
        return _as_list(result)

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
        logger.warning(f"{functions} ({', '.join(self.names)}) returned None or NaN for {where}: {consequence}; make "
                       "at least one reward function return a number for every row (None means not applicable)")

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

    def _checked(self, fn: RewardFn, name: str, outcome: Outcome, batch: RewardBatch,
                 logs: StepLogs) -> tuple[list[float | None], Failures]:
        """A function's values checked (numbers, None or NaN: not applicable); its logs kept if it scored."""
        result, rows = outcome.result, batch.rows
        if isinstance(result, Exception):
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} raised {type(result).__name__}: {result} "
                                  f"(on dataset rows {_rows_text(rows)})")
            return self._row_by_row(fn, name, batch, logs)
        if len(result) != len(batch):
            problem = f"returned {len(result)} values for {len(batch)} completions"
            if self.on_error == "fail":
                raise RewardError(f"reward function {name!r} {problem} (dataset rows {_rows_text(rows)})")
            return [0.0] * len(batch), Failures(len(batch), problem, rows[0])
        checked: list[float | None] = []
        failure = Failures()
        for i, value in enumerate(result):
            number = _number(value)
            if number is _INVALID:
                if self.on_error == "fail":
                    raise RewardError(f"reward function {name!r} returned {value!r} for dataset row {rows[i]} "
                                      f"(completion {i}); {EXPECTED}")
                number = 0.0
                failure.add(f"returned {value!r}; {EXPECTED}", rows[i])
            checked.append(number)
        _keep(name, logs, outcome.logs, range(len(batch)))
        return checked, failure

    def _row_by_row(self, fn: RewardFn, name: str, batch: RewardBatch,
                    logs: StepLogs) -> tuple[list[float | None], Failures]:
        """``on_error="zero"`` after a raise: find the rows that raise; each of those scores 0."""
        values: list[float | None] = []
        failure = Failures()
        for i in range(len(batch)):
            call = CallLogs()
            result = self._run(fn, batch.row(i).keywords(call))
            if isinstance(result, Exception):
                number, problem = _INVALID, f"{type(result).__name__}: {result}"
            elif len(result) != 1:
                number, problem = _INVALID, f"returned {len(result)} values for 1 completion"
            else:
                number, problem = _number(result[0]), f"returned {result[0]!r}; {EXPECTED}"
            if number is _INVALID:
                number = 0.0
                failure.add(problem, batch.rows[i])
            else:
                _keep(name, logs, call, range(i, i + 1))
            values.append(number)
        return values, failure


@dataclass
class Outcome:
    """One function's call on a batch: its values or the exception it raised, and what it logged."""

    logs: CallLogs
    result: list[Any] | Exception | None = None


async def _awaited(fn: RewardFn, keywords: dict[str, Any]) -> Any:
    """The call of an async function, its raise included (TypeError for a keyword it cannot take)."""
    return await fn(**keywords)


def _as_list(result: Any) -> list[Any] | Exception:
    """A function's values as a list, or the exception standing for its result."""
    if isinstance(result, BaseException):
        if not isinstance(result, Exception):  # KeyboardInterrupt, SystemExit: not the function's rows' fault
            raise result
        return result
    try:
        return list(result)
    except TypeError as err:  # None or a number in place of the list: theirs to see, in one line
        return TypeError(f"returned {type(result).__name__}, not a list of rewards ({err})")


def _keep(name: str, logs: StepLogs, call: CallLogs, positions: range) -> None:
    problem = logs.keep(call, positions)
    if problem:
        raise RewardError(f"reward function {name!r} {problem}")


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


EXPECTED = "expected a number, or None or NaN for not applicable"


def _number(value: Any) -> Any:
    """A float, None for "not applicable" (None or NaN: TRL turns None into NaN and sums with ``nansum``), or
    ``_INVALID``. A bool counts 1.0 or 0.0, as in TRL's float tensor of the values; an infinity is refused
    (TRL would take it, and every advantage of its group would be NaN)."""
    if value is None:
        return None
    if not hasattr(value, "__float__"):
        return _INVALID
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _INVALID
    if math.isnan(number):
        return None
    return number if math.isfinite(number) else _INVALID


def _rows_text(rows: Sequence[int]) -> str:
    unique = sorted(set(rows))
    return ", ".join(map(str, unique[:8])) + (" ..." if len(unique) > 8 else "")
