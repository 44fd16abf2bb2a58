"""How reward functions are called, as TRL 1.16's GRPOTrainer calls them (``_calculate_rewards``).

Every function gets the keywords ``prompts``, ``completions``, ``completion_ids``, ``trainer_state`` (a
``transformers.TrainerState`` of the step being scored), ``log_metric(name, value)``, ``log_extra(column,
values)`` and one keyword per dataset column (one value per completion). Synchronous functions run one
after another, then the ``async`` ones (coroutine functions, ``functools.partial`` of one, or objects with
an ``async def __call__``) all at once with ``asyncio.gather`` on one event loop that lives for the run in a
daemon thread, as TRL runs them: a client that binds to the loop it first ran on (an HTTP session of an LLM
judge) keeps working from step to step.

``log_metric`` values are averaged over the step's calls (TRL: ``sum / count`` over calls and ranks) and
logged under the name given; ``log_extra`` columns (one value per completion) go to the completion records
of samples/.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from fp16rl.core.ranks import is_main_process
from fp16rl.tasks.base import RunProgress

# Keywords the trainer passes besides the dataset's columns: a column of one of these names is refused.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# Columns TRL drops before the call (the prompt column is dropped too: it arrives as ``prompts``).
DROPPED_COLUMNS = ("completion", "completion_ids")
# Metric namespaces the reward layer writes itself (reward/mean, reward/<fn>/mean, data/skipped_long_prompts):
# a log_metric name there would overwrite one of them.
RESERVED_METRIC_PREFIXES = ("reward/", "data/")
_UNSET = object()  # an extra column's slot no call has filled (a logged value may itself be None)


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine, for the forms TRL recognises (its ``is_async_callable``):
    coroutine functions, ``functools.partial`` of one, objects whose ``__call__`` is ``async``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class EventLoop:
    """One asyncio loop on a daemon thread, started on first use; runs coroutines from this thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def gather(self, awaitables: Sequence[Awaitable[Any]]) -> list[Any]:
        """The results of ``awaitables`` run concurrently, in order; an exception is returned in its place."""
        async def together() -> list[Any]:
            return list(await asyncio.gather(*awaitables, return_exceptions=True))

        return asyncio.run_coroutine_threadsafe(together(), self._started()).result()

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="fp16rl-reward-loop", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def close(self) -> None:
        """Stop the loop and its thread (a later ``gather`` starts a new one)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
        self._loop = self._thread = None


def trainer_state(progress: RunProgress | None, steps_per_epoch: int) -> Any:
    """A ``transformers.TrainerState`` of the step being scored, the fields a reward schedule reads filled
    as Trainer fills them: ``global_step``, ``max_steps``, ``epoch = global_step / steps_per_epoch``,
    ``num_train_epochs = ceil(max_steps / steps_per_epoch)``, and whether this is the main process."""
    from transformers import TrainerState

    progress = progress or RunProgress()
    per_epoch = max(steps_per_epoch, 1)
    return TrainerState(global_step=progress.global_step, max_steps=progress.max_steps,
                        epoch=progress.global_step / per_epoch,
                        num_train_epochs=math.ceil(progress.max_steps / per_epoch),
                        is_world_process_zero=is_main_process(),
                        is_local_process_zero=os.environ.get("LOCAL_RANK", "0") in ("", "0"))


@dataclass
class CallLogs:
    """What one call of a reward function logged through ``log_metric`` and ``log_extra``; kept only if the
    call succeeds (a call that raised is retried row by row under ``--reward-on-error zero``)."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric``: a scalar for this step, logged as ``name`` (the mean of the step's values)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metric(name, value): name must be a non-empty string, got {name!r}")
        if name.startswith(RESERVED_METRIC_PREFIXES):
            raise ValueError(f"log_metric({name!r}, ...): names starting with {' or '.join(RESERVED_METRIC_PREFIXES)} "
                             "are fp16rl's own metrics; choose another name")
        self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """TRL's ``log_extra``: a column of the completions' records, one value per completion (several calls
        for one column extend it, as in TRL)."""
        if not isinstance(column, str) or not column:
            raise TypeError(f"log_extra(column, values): column must be a non-empty string, got {column!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"log_extra({column!r}, values): values must be a list, one per completion")
        self.extra.setdefault(column, []).extend(_json_safe(v) for v in values)


def _json_safe(value: Any) -> Any:
    """``value`` if samples/ (JSON) can hold it, else its ``tolist()`` (numpy, torch) or its text."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return value.tolist() if hasattr(value, "tolist") else str(value)


@dataclass
class StepLogs:
    """The logs of every successful call of one batch: metric (sum, count) pairs and, per extra column, a
    value per completion (None where nothing was logged for it)."""

    size: int
    metric_sums: dict[str, tuple[float, int]] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def keep(self, call: CallLogs, positions: range) -> str | None:
        """Add a successful call's logs (it scored the completions at ``positions``); the problem with its
        ``log_extra`` columns (not one value per completion, or a column another call filled) or None."""
        for name, values in call.metrics.items():
            total, count = self.metric_sums.get(name, (0.0, 0))
            self.metric_sums[name] = (total + sum(values), count + len(values))
        for column, values in call.extra.items():
            if len(values) != len(positions):
                return (f"logged {len(values)} values for the column {column!r} (log_extra) for {len(positions)} "
                        "completions; log one value per completion")
            slots = self.extra.setdefault(column, [_UNSET] * self.size)
            if any(slots[p] is not _UNSET for p in positions):
                return f"logged the column {column!r} (log_extra) that another reward function filled in this step"
            for position, value in zip(positions, values):
                slots[position] = value
        return None

    def metrics(self) -> dict[str, float]:
        return {name: total / count for name, (total, count) in self.metric_sums.items()}

    def details(self) -> list[dict[str, Any]]:
        """Per completion, its extra columns (none at all when no function logged one)."""
        if not self.extra:
            return []
        return [{column: None if values[i] is _UNSET else values[i] for column, values in self.extra.items()}
                for i in range(self.size)]


@dataclass
class RewardBatch:
    """The completions of a step as reward functions get them, and the dataset rows they were written for."""

    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]]  # one keyword per dataset column, a value per completion
    rows: list[int]  # the dataset row of each completion, for messages that name it
    trainer_state: Any

    def __len__(self) -> int:
        return len(self.completions)

    def row(self, i: int) -> "RewardBatch":
        """Completion ``i`` alone (``--reward-on-error zero`` finds the rows a function fails on)."""
        return RewardBatch([self.prompts[i]], [self.completions[i]], [self.completion_ids[i]],
                           {name: [values[i]] for name, values in self.columns.items()}, [self.rows[i]],
                           self.trainer_state)

    def keywords(self, logs: CallLogs) -> dict[str, Any]:
        """The keyword arguments of one call, as TRL passes them; ``logs`` collects what the call logs."""
        return {"prompts": self.prompts, "completions": self.completions, "completion_ids": self.completion_ids,
                **self.columns, "trainer_state": self.trainer_state, "log_metric": logs.log_metric,
                "log_extra": logs.log_extra}
