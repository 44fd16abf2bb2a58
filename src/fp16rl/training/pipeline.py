"""The learner's side of asynchronous rollouts (``--max-staleness K >= 1``): the steps in flight.

Schedule (fixed, never "whoever finishes first"): step t samples with the weights after
``max(0, t - 1 - K)`` RL steps (``rollout/worker.py`` ``version_of``); K = 0 is the synchronous loop,
which does not use this module. A sampler process (``rollout/worker.py`` ``serve``) generates, a thread
of this process scores, and the learner trains, all at once:

- ``AsyncRollouts`` starts the worker with the run's ``Sampler`` and submits steps ``s+1 .. s+1+K`` (s:
  the steps done, 0 or a resume's), each right after the weight version it needs;
- after each optimizer step t the learner records its weights (``WeightHistory``), and ``advance(t)``
  sends them and submits step ``t+1+K``, which needs exactly them;
- the scoring thread takes the worker's results in step order, decodes and scores them (a reward that
  waits on I/O releases the GIL, so it overlaps the learner's compute);
- ``take(t)`` waits for step t's sampled tokens (the scoring thread hands them over before it scores them),
  computes the trainer's logprobs of them at the weights that sampled (``lstale``, the weights swapped in
  for one no-grad forward: the precision side of ``measure/staleness.py``) and, unless the training forward
  gives it, at the current weights, and only then waits for the scores. Those forwards need the tokens, not
  the rewards, so with a reward that waits they run during the wait instead of after it: with K = 1 the
  chain "sample t+2, score it, train it" that bounds the period then holds one forward less.

Every completion depends only on (seed, step, slot, g), the prompt and the weights version, all fixed by
the schedule, and each engine computes with a fixed thread count, so two runs with the same options log
the same metrics whatever the timing. A checkpoint of step s keeps the versions ``s-K .. s-1``
(``stale_weights.safetensors``): a resume regenerates the rollouts that were in flight, exactly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing

from fp16rl.config.options import TrainConfig
from fp16rl.core.errors import ConfigError, UserError
from fp16rl.core.scores import Scores
from fp16rl.core.seeds import step_seed
from fp16rl.learner.weights import MasterWeights
from fp16rl.measure.rollouts import Measurement, TrainerForward, trainer_inputs
from fp16rl.model.precision import DtypeRecorder
from fp16rl.rollout.draw import SamplingParams
from fp16rl.rollout.sampler import Sampler
from fp16rl.rollout.worker import (SampledJob, SampleJob, WeightVersion, WorkerFailure, needed_versions, serve,
                                   version_of)
from fp16rl.tasks.base import RunProgress, Task, encode_text
from fp16rl.training.interrupt import StopRequest

logger = logging.getLogger("fp16rl")
_POLL_S = 0.05  # how often a wait looks at Ctrl-C and the worker's health
SAMPLER_PROCESS = "fp16rl-sampler"  # the worker process's name (``refuse_in_sampler_process``)


@dataclass
class Sampled:
    """One step's rollouts, measured and scored: what the rest of ``Trainer.step`` starts from.
    ``grouped_items``: each completion's prompt item; ``stale``: the trainer's logprobs at the weights that
    sampled (asynchronous steps only); ``extra``: metrics only asynchronous steps log."""

    grouped_items: list[Any]
    measured: Measurement
    completions: list[str]
    token_lists: list[list[int]]
    scores: Scores
    reward_s: float
    stale: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)


class WeightHistory:
    """The FP32 trainable weights after each recent RL step (LoRA: the adapters), as long as a step in
    flight samples with them or measures them: versions ``t-K .. t`` after step t."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.versions: dict[int, dict[str, torch.Tensor]] = {}

    def record(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Keep a copy of ``weights`` as ``version``; forget the versions no later step needs."""
        self.versions[version] = {name: t.detach().float().cpu().clone() for name, t in weights.items()}
        for old in [v for v in self.versions if v < version - self.max_staleness]:
            del self.versions[old]

    def checkpoint_tensors(self, step: int) -> dict[str, torch.Tensor]:
        """What a checkpoint of ``step`` keeps: the older versions steps in flight need, keyed ``v/name``."""
        return {f"{v}/{name}": t for v in needed_versions(step, self.max_staleness)
                for name, t in self.versions[v].items()}

    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Take the versions a checkpoint kept (``checkpoint_tensors``)."""
        for key, tensor in tensors.items():
            version, _, name = key.partition("/")
            self.versions.setdefault(int(version), {})[name] = tensor

    def require(self, step: int, source: str) -> None:
        """Refuse a resume from ``step`` whose checkpoint lacks a version the steps in flight need."""
        missing = [v for v in needed_versions(step, self.max_staleness) if v not in self.versions]
        if missing:
            raise ConfigError(f"{source} keeps no weights of step {missing[0]}, which --max-staleness "
                              f"{self.max_staleness} samples with after a resume; resume with the --max-staleness "
                              "the run was saved with")


@contextlib.contextmanager
def at_weights(weights: MasterWeights, version: dict[str, torch.Tensor]) -> Iterator[None]:
    """The policy computing with ``version`` (cast into its compute copy as ``masters_to_model`` does)
    for the block, its own weights back afterwards (the masters untouched)."""
    with torch.no_grad():
        kept = [p.detach().clone() for p in weights.params]
        for name, param in zip(weights.names, weights.params):
            param.copy_(version[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for param, own in zip(weights.params, kept):
                param.copy_(own)


def start_immune_to_ctrl_c(process: Any) -> None:
    """Start ``process`` with SIGINT ignored from its first instruction: a terminal's Ctrl-C reaches the
    whole process group, the learner alone decides when to stop, and an ignored signal stays ignored
    across the spawn's exec (Python then installs no handler of its own)."""
    if threading.current_thread() is not threading.main_thread():
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def refuse_in_sampler_process() -> None:
    """Refuse to build a run inside the sampler process. ``spawn`` imports the user's script again in the
    child; a script that trains at top level, without ``if __name__ == "__main__":``, would build a whole
    second run there (and multiprocessing then fails in its bootstrapping phase)."""
    if multiprocessing.current_process().name == SAMPLER_PROCESS:
        raise UserError('fp16rl\'s sampler process imported a script that starts training at top level: with '
                        '--max-staleness put the training under `if __name__ == "__main__":` (the sampler process '
                        'is spawned, as in torch.multiprocessing)')


def split_threads(threads: int) -> tuple[int, int]:
    """The run's CPU threads shared out as (sampler, learner): half each, the learner the odd one."""
    sampler = max(1, threads // 2)
    return sampler, max(1, threads - sampler)


@dataclass(frozen=True)
class RolloutSide:
    """What the pipeline reads of the run: the task, the sampler to start the worker with, how it samples,
    the run's length and CPU threads (None on CUDA)."""

    config: TrainConfig
    task: Task
    tokenizer: Any
    sampler: Sampler
    sampling: SamplingParams
    total_steps: int
    threads: int | None
    device: torch.device


class AsyncRollouts:
    """The sampler process, the scoring thread and the steps in flight of one run (module docstring)."""

    def __init__(self, side: RolloutSide, history: WeightHistory, done: int):
        """Start after ``done`` steps: versions ``done-K .. done`` are in ``history``."""
        self.side, self.history, self.max_staleness = side, history, side.config.max_staleness
        self.tokenizer_lock = threading.Lock()
        self.ready: dict[int, Any] = {}  # step -> scored result (or the exception that stopped the thread)
        self.ready_changed = threading.Condition()
        self.prompts: dict[int, list[Any]] = {}
        self.closing, self.sent_version = False, -1
        self.submit_failed = False  # a step whose job could not be made: nothing after it is sent
        context = torch.multiprocessing.get_context("spawn")
        self.inbox, self.outbox, self.stop_worker = context.Queue(), context.Queue(), context.Event()
        sampler_threads, learner_threads = split_threads(side.threads or 1)
        self.process = context.Process(target=serve, args=(side.sampler, sampler_threads, self.inbox, self.outbox,
                                                           self.stop_worker), daemon=True, name=SAMPLER_PROCESS)
        self.scorer = threading.Thread(target=self._score_steps, args=(done + 1,), daemon=True, name="fp16rl-scorer")
        start_immune_to_ctrl_c(self.process)
        try:  # a start that fails half-way leaves no process or thread behind
            if side.threads is not None:
                torch.set_num_threads(learner_threads)
            self.scorer.start()
            for step in range(done + 1, done + 2 + self.max_staleness):
                self._submit(step)
        except BaseException:
            self.close()
            raise

    def _submit(self, step: int) -> None:
        """Send the worker the weights ``step`` samples with (unless sent last) and ``step``'s job. A job that
        cannot be made (the task's ``batch`` refuses the step's prompts) is ``step``'s result, raised when the
        learner takes ``step``, as the synchronous loop raises it there; nothing after it is sent (the
        scoring thread reads the worker's results in step order)."""
        if step > self.side.total_steps or self.submit_failed:
            return
        try:
            self._send_job(step)
        except Exception as err:
            self.submit_failed = True
            with self.ready_changed:
                self.ready[step] = err
                self.ready_changed.notify_all()

    def _send_job(self, step: int) -> None:
        cfg = self.side.config
        with self.tokenizer_lock:  # the scoring thread decodes with the same tokenizer
            items = self.side.task.batch(step - 1, cfg.prompts_per_step)
            prompt_ids = [encode_text(self.side.tokenizer, item.text) for item in items]
        version = version_of(step, self.max_staleness)
        if version != self.sent_version:
            self.inbox.put(WeightVersion.pack(version, self.history.versions[version]))
            self.sent_version = version
        max_rows = self.side.sampler.rows_per_call(cfg.generation_batch_size, cfg.gpu_memory_utilization, prompt_ids,
                                                   cfg.max_completion_length, cfg.num_generations)
        self.prompts[step] = [item for item in items for _ in range(cfg.num_generations)]
        self.inbox.put(SampleJob(step, prompt_ids, cfg.num_generations, self.side.sampling, step_seed(cfg.seed, step),
                                 list(range(len(items))), max_rows, cfg.vocab_parity_positions))

    def advance(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        """Step ``step`` updated the weights to ``weights`` (the FP32 masters): keep them as its version and
        sample step ``step + 1 + K`` with them."""
        self.history.record(step, weights)
        self._submit(step + 1 + self.max_staleness)

    # --- the scoring thread ------------------------------------------------------------------

    def _score_steps(self, first: int) -> None:
        """Score the worker's results in step order until the run's last step (or ``close``)."""
        for step in range(first, self.side.total_steps + 1):
            with self.ready_changed:
                if step in self.ready:  # its job could not be made (``_submit``): nothing comes after it
                    return
            try:
                result = self._next_result()
                if result is None:
                    return
                self._publish(step, result)  # the learner measures the tokens while they are scored
                scored = self._score(step, result)
            except BaseException as err:  # handed to the learner, which raises it in its own thread
                scored = err
            self._publish(step, scored)
            if isinstance(scored, BaseException):
                return

    def _publish(self, step: int, value: Any) -> None:
        """``step``'s entry in ``ready``: its ``SampledJob`` (sampled, being scored), then the scored result or
        the exception that stopped the thread."""
        with self.ready_changed:
            self.ready[step] = value
            self.ready_changed.notify_all()

    def _next_result(self) -> SampledJob | None:
        """The worker's next result; None once closing; a worker that died or failed raises."""
        while not self.closing:
            try:
                message = self.outbox.get(timeout=_POLL_S)
            except queue.Empty:  # look at the worker, then wait again
                if not self.process.is_alive():
                    raise RuntimeError(f"the sampler process ended unexpectedly (exit code {self.process.exitcode}); "
                                       "a script that trains with --max-staleness must run it under "
                                       "`if __name__ == \"__main__\":` (the sampler process is spawned and "
                                       "imports the script again)")
                continue
            if isinstance(message, WorkerFailure):
                raise RuntimeError("the sampler process failed: " + message.message.strip().splitlines()[-1]) from None
            return message
        return None

    def _score(self, step: int, result: SampledJob) -> tuple[SampledJob, list[str], list[list[int]], Scores, float]:
        rollouts = result.rollouts
        token_lists = rollouts.completion_lists()
        with self.tokenizer_lock:
            completions = self.side.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        start = time.perf_counter()
        scores = self.side.task.score(self.prompts[step], completions, rollouts.truncated, token_lists,
                                      progress=RunProgress(global_step=step - 1, max_steps=self.side.total_steps))
        return result, completions, token_lists, scores, time.perf_counter() - start

    # --- the learner's side ------------------------------------------------------------------

    def _wait(self, step: int, stop: StopRequest, scored: bool) -> tuple[Any, float]:
        """Step ``step``'s entry once it is scored (``scored``) or at least sampled (a ``SampledJob`` or already
        the scored result), and the seconds waited (Ctrl-C polled); an exception the thread handed over is raised."""
        start = time.perf_counter()
        with self.ready_changed:
            while not self._arrived(step, scored):
                self.ready_changed.wait(_POLL_S)
                stop.check()
                if not self.scorer.is_alive() and not self._arrived(step, scored):
                    raise RuntimeError(f"the scoring thread stopped before step {step}")
            result = self.ready[step]
            if scored or isinstance(result, BaseException):
                del self.ready[step]
        if isinstance(result, BaseException):
            raise result
        return result, time.perf_counter() - start

    def _arrived(self, step: int, scored: bool) -> bool:
        value = self.ready.get(step)
        return value is not None and not (scored and isinstance(value, SampledJob))

    @torch.no_grad()
    def take(self, step: int, stop: StopRequest, forward: TrainerForward, weights: MasterWeights,
             recompute: bool) -> Sampled:
        """Step ``step``'s rollouts, scored, with the trainer's logprobs at the weights that sampled them
        and (``recompute``) at the current ones, computed while the rewards are (module docstring); the
        seconds the learner waited for the pipeline in ``extra``'s ``time/wait_s``."""
        got, waited_tokens = self._wait(step, stop, scored=False)
        result: SampledJob = got if isinstance(got, SampledJob) else got[0]  # or already scored
        rollouts, version = result.rollouts, result.version
        start = time.perf_counter()
        # The full-vocabulary parity is precision too: its trainer side from the same forward at the sampling weights.
        tokens, vocab = trainer_inputs(rollouts, forward, self.side.tokenizer.pad_token_id)
        recorder = DtypeRecorder()
        watch: Callable[[torch.nn.Module], Any] = stop.watching_layers
        with recorder.watch(forward.model), watch(forward.model), at_weights(weights, self.history.versions[version]):
            stale, _ = forward.logprobs(tokens, vocab=vocab)
        current, entropy = forward.logprobs(tokens, with_entropy=True) if recompute else (None, None)
        measured = Measurement(rollouts, tokens, current, entropy,
                               {"sampler": rollouts.observed_dtype, "trainer": recorder.report()},
                               result.sample_s, time.perf_counter() - start, vocab)
        (_, completions, token_lists, scores, reward_s), waited_scores = self._wait(step, stop, scored=True)
        return Sampled(self.prompts.pop(step), measured, completions, token_lists, scores, reward_s, stale,
                       {"staleness/version_lag": float(step - 1 - version),
                        "time/wait_s": waited_tokens + waited_scores})

    def close(self) -> None:
        """Stop the worker and the thread (the end of a run, an error or Ctrl-C); give the learner its
        threads back."""
        self.closing = True
        self.stop_worker.set()  # a job in progress is abandoned at its next token
        with contextlib.suppress(Exception):
            self.inbox.put(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        for channel in (self.inbox, self.outbox):
            channel.cancel_join_thread()
            channel.close()
        # A reward in progress finishes before the run closes its task (an ARC sandbox pool closed under a
        # running score would be rebuilt by it and left behind); the thread looks at ``closing`` between steps.
        if self.scorer.is_alive():
            self.scorer.join()
        if self.side.threads is not None:
            torch.set_num_threads(self.side.threads)
