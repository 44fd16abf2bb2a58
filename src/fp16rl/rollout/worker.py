"""The sampler's own process, for asynchronous rollouts (``--max-staleness K >= 1``).

The learner (``fp16rl.training.pipeline``) starts ``serve`` in a spawned process with its ``Sampler``
(pickled through ``torch.multiprocessing``: the frozen weights travel as shared memory, not copies) and
sends it, in one ordered queue, weight versions and sampling jobs. The worker handles them strictly in
order: a ``WeightVersion`` is loaded into the sampler (``Sampler.sync_from``), a ``SampleJob`` is sampled
with whatever version came last. The learner sends the version a job must use right before the job, so
the weights behind every completion are fixed by the schedule, never by timing. Each job's ``Rollouts``
go back whole (pickled, so fields the sampler adds travel along), with the seconds it took.

The worker ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the learner alone
decides when to stop (``training/interrupt.py``); it closes the worker by setting ``stop`` (polled per
decoded token, so a job in progress is abandoned at once) and sending ``None``. A worker whose learner
died without closing it (killed, out of memory) sees its parent gone within ``_POLL_S`` and exits.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fp16rl.rollout.draw import SamplingParams
from fp16rl.rollout.sampler import Sampler

_POLL_S = 1.0  # how often an idle worker checks that its learner is still alive


@dataclass(frozen=True)
class SampleJob:
    """One step's sampling: ``Sampler.generate``'s arguments (``step`` names the result)."""

    step: int
    prompt_ids: list[list[int]]
    num_generations: int
    params: SamplingParams
    seed: int
    slots: list[int]
    max_rows: int | None = None
    vocab_positions: int = 0  # the full-vocabulary parity's positions (0: none)


@dataclass(frozen=True)
class WeightVersion:
    """The trainable weights after ``version`` RL steps (LoRA: the adapters only), packed in one fp32
    buffer so that a version crosses the process boundary as one shared-memory block."""

    version: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat: torch.Tensor

    @classmethod
    def pack(cls, version: int, weights: dict[str, torch.Tensor]) -> "WeightVersion":
        names = tuple(weights)
        flat = torch.cat([weights[n].detach().reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
        return cls(version, names, tuple(tuple(weights[n].shape) for n in names), flat)

    def unpack(self) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            out[name] = self.flat[offset: offset + size].view(shape)
            offset += size
        return out


@dataclass(frozen=True)
class SampledJob:
    """A job's result: its ``Rollouts``, the sampling seconds and the weight version that drew them."""

    step: int
    rollouts: Any
    sample_s: float
    version: int


@dataclass(frozen=True)
class WorkerFailure:
    """The worker's last message when a job or a weight load raised: the traceback's text."""

    message: str


class Stopped(Exception):
    """The learner set the stop event: the job in progress is abandoned."""


def serve(sampler: Sampler, threads: int, inbox: Any, outbox: Any, stop: Any) -> None:
    """The worker's loop: until ``None`` or ``stop`` (a multiprocessing ``Event``), load each
    ``WeightVersion`` and sample each ``SampleJob`` from ``inbox`` in order, putting a ``SampledJob`` (or
    one ``WorkerFailure``) in ``outbox``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    version = -1

    def should_stop() -> None:
        if stop.is_set():
            raise Stopped

    try:
        while (message := _next(inbox, stop)) is not None:
            if isinstance(message, WeightVersion):
                sampler.sync_from(message.unpack())
                version = message.version
                continue
            outbox.put(sample(sampler, message, version, should_stop))
    except Stopped:
        return
    except Exception:  # the learner reports it as one line and stops the run
        outbox.put(WorkerFailure(traceback.format_exc()))


def _next(inbox: Any, stop: Any) -> Any:
    """The next message, or None once the learner stopped the worker or is gone."""
    while not stop.is_set():
        try:
            return inbox.get(timeout=_POLL_S)
        except queue.Empty:
            parent = multiprocessing.parent_process()
            if parent is not None and not parent.is_alive():
                return None
    return None


def sample(sampler: Sampler, job: SampleJob, version: int, should_stop: Any = None) -> SampledJob:
    """Generate ``job``'s completions with the sampler's current weights (``version``); ``should_stop`` is
    polled per decoded token and raises to abandon the job."""
    start = time.perf_counter()
    rollouts = sampler.generate(job.prompt_ids, job.num_generations, job.params, seed=job.seed, slots=job.slots,
                                should_stop=should_stop, max_rows=job.max_rows, vocab_positions=job.vocab_positions)
    return SampledJob(job.step, rollouts, time.perf_counter() - start, version)


def version_of(step: int, max_staleness: int) -> int:
    """The weights that sample step ``step`` (1-based): those after ``step - 1 - K`` RL steps, at least the
    initial ones (version 0). K = 0 is the synchronous loop: the weights after step ``step - 1``."""
    return max(0, step - 1 - max_staleness)


def needed_versions(step: int, max_staleness: int) -> Sequence[int]:
    """The versions older than ``step``'s own that the steps after ``step`` still sample or measure with:
    what a checkpoint of ``step`` keeps so that a resume regenerates the rollouts in flight."""
    return range(max(0, step - max_staleness), step)
