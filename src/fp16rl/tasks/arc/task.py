"""ArcTask: ARC code induction as an RL task (prompts per step, sandboxed rewards).

Data order. Prompt slot ``s`` of step ``t`` (``num_prompts`` per step) sits at position
``p = t * num_prompts + s`` of an endless stream: epoch ``p // n`` visits the ``n`` task ids (sorted)
in the order ``np.random.default_rng([seed, epoch]).permutation(n)``. A prompt longer than
``max_prompt_tokens`` is skipped for the next position's task (which then also appears at its own
position) and counted in ``data/skipped_long_prompts``. Its augmentation comes from
``(seed, step, slot)`` alone. So ``batch(step, n)`` is a pure function of the seed and step: resume
needs only the step, and arms with the same seed see identical prompts.

Test pair. A task with several test pairs shows test input ``epoch % n_test`` in the prompt (every
test input gets shown over the epochs); the reward always runs the program on all train inputs
and all test inputs, so ``n_test`` in the reward counts every test pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fp16rl.sandbox import ExecutionResult, Outcome, Sandbox, SandboxLimits, extract_code
from fp16rl.tasks.arc.augment import Augmentation, augmentation_for
from fp16rl.tasks.arc.copying import apply_verdict, judge_copying
from fp16rl.tasks.arc.data import ArcDataset, Grid, load_dataset
from fp16rl.tasks.arc.encoders import get_encoder
from fp16rl.tasks.arc.prompts import PromptTemplate, build_messages, render_messages
from fp16rl.tasks.arc.reward import evaluate, get_reward, step_metrics
from fp16rl.tasks.base import PromptItem, RunProgress, count_tokens
from fp16rl.core.scores import Scores

MAX_CONSECUTIVE_LONG = 64  # more skipped in a row means max_prompt_tokens is set far too low
NO_CODE_ERROR = "no ```python code block in the completion"


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_tasks: int) -> np.ndarray:
    """Task indices (into the sorted ids) in the order epoch ``epoch`` visits them."""
    return np.random.default_rng([seed, epoch]).permutation(num_tasks)


@dataclass(frozen=True)
class ArcTaskSettings:
    """How the ARC workload is drawn, shown and scored (``make_task`` fills it from the train options).

    ``prompts_per_step`` only feeds :attr:`ArcTask.num_steps_per_epoch`; ``max_prompt_tokens``
    (None: no length check) needs a tokenizer to measure prompts; ``timeout_s`` and
    ``memory_limit_mb`` are the sandbox's limits of one program, ``n_jobs`` its workers (-1: this
    process's cores); ``skip_invalid`` skips malformed tasks (counted) instead of failing on the first.
    """

    encoder: str = "ColorNameEncoder()"
    template: PromptTemplate | None = None
    augment: bool = True
    seed: int = 0
    prompts_per_step: int = 1
    reward_name: str = "arc-v2-no-pixel-score"
    n_jobs: int = -1
    timeout_s: float = 1.0
    memory_limit_mb: int = 4096
    max_prompt_tokens: int | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.prompts_per_step < 1:
            raise ValueError("prompts_per_step must be >= 1")


class ArcTask:
    """The ARC workload behind the :class:`~fp16rl.tasks.base.Task` protocol."""

    name = "arc"

    def __init__(self, dataset: str | Path | ArcDataset, tokenizer: Any | None = None,
                 settings: ArcTaskSettings = ArcTaskSettings()) -> None:
        """``dataset`` is a spec for :func:`~fp16rl.tasks.arc.data.load_dataset` or a loaded set;
        ``tokenizer`` renders the chat template and measures prompts (None: plain layout, no
        length check)."""
        if settings.max_prompt_tokens is not None and tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer to measure prompts")
        self.settings = settings
        self.dataset = (
            dataset if isinstance(dataset, ArcDataset) else load_dataset(dataset, skip_invalid=settings.skip_invalid)
        )
        self.task_ids = self.dataset.task_ids
        self.tokenizer = tokenizer
        self.encoder = get_encoder(settings.encoder)
        self.template = settings.template or PromptTemplate()
        self.augment = settings.augment
        self.seed = settings.seed
        self.prompts_per_step = settings.prompts_per_step
        self.reward_name = settings.reward_name
        self.reward_fn = get_reward(settings.reward_name)
        self.limits = SandboxLimits(timeout_s=settings.timeout_s, memory_mb=settings.memory_limit_mb)
        self.n_jobs = settings.n_jobs
        self.max_prompt_tokens = settings.max_prompt_tokens
        self._sandbox: Sandbox | None = None

    @property
    def num_steps_per_epoch(self) -> int:
        """Steps to visit every task once at ``prompts_per_step`` prompts per step."""
        return math.ceil(len(self.task_ids) / self.prompts_per_step)

    def task_at(self, position: int) -> tuple[str, int]:
        """(task id, epoch) at a position of the data stream."""
        epoch, index = divmod(position, len(self.task_ids))
        return self.task_ids[int(epoch_order(self.seed, epoch, len(self.task_ids))[index])], epoch

    def augmentation(self, step: int, slot: int) -> Augmentation:
        """The augmentation of a prompt slot (identity when augmentation is off)."""
        return augmentation_for(self.seed, step, slot) if self.augment else Augmentation()

    def batch(self, step: int, num_prompts: int) -> list[PromptItem]:
        """Prompts of ``step``: a pure function of (seed, step, num_prompts)."""
        return [self._prompt(step, slot, step * num_prompts + slot) for slot in range(num_prompts)]

    def _prompt(self, step: int, slot: int, position: int) -> PromptItem:
        aug = self.augmentation(step, slot)
        lengths: list[int] = []
        for skipped in range(MAX_CONSECUTIVE_LONG):
            task_id, epoch = self.task_at(position + skipped)
            task = aug.apply_task(self.dataset.tasks[task_id])
            test_index = epoch % len(task["test"])
            messages = build_messages(task, test_index, self.encoder, self.template)
            text = render_messages(messages, self.tokenizer)
            if self.max_prompt_tokens is not None:
                lengths.append(count_tokens(self.tokenizer, text))
                if lengths[-1] > self.max_prompt_tokens:
                    continue
            meta = {
                "task_id": task_id,
                "epoch": epoch,
                "test_index": test_index,
                "augmentation": aug.describe(),
                "skipped_long_prompts": skipped,
                "train": task["train"],
                "test": task["test"],
            }
            return PromptItem(text=text, uid=f"{task_id}/{self.seed}.{step}.{slot}", meta=meta)
        raise ValueError(
            f"{MAX_CONSECUTIVE_LONG} consecutive prompts exceed max_prompt_tokens={self.max_prompt_tokens}"
            f" (shortest {min(lengths)} tokens); raise the limit or use a dataset with smaller tasks"
        )

    def describe(self) -> dict[str, Any]:
        """What config.yaml records about the workload, including which sandbox layers are active."""
        return {
            "dataset": self.dataset.source,
            "num_tasks": len(self.task_ids),
            "skipped_invalid_tasks": len(self.dataset.skipped),
            "reward": self.reward_name,
            "grid_encoder": self.encoder.name,
            "augmentation": self.augment,
            "sandbox_layers": self.sandbox.layers(),
        }

    @property
    def sandbox(self) -> Sandbox:
        """One worker pool for the whole run (spawning workers costs seconds)."""
        if self._sandbox is None:
            self._sandbox = Sandbox(n_jobs=self.n_jobs, limits=self.limits)
        return self._sandbox

    def execute(self, items: Sequence[PromptItem], completions: Sequence[str]) -> list[ExecutionResult]:
        """Run each completion's code on its item's train and test inputs (in parallel)."""
        return self._execute(items, [extract_code(c) for c in completions])

    def _execute(self, items: Sequence[PromptItem], codes: Sequence[str | None]) -> list[ExecutionResult]:
        jobs = [(code, _inputs(item.meta)) for code, item in zip(codes, items) if code is not None]
        ran = iter(self.sandbox.run_many(jobs) if jobs else [])
        return [
            next(ran) if code is not None else _no_code_result(len(_inputs(item.meta)))
            for code, item in zip(codes, items)
        ]

    def score(self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool],
              completion_ids: Sequence[list[int]] | None = None, progress: RunProgress | None = None) -> Scores:
        """Rewards, per-step metrics and per-completion details for a batch of completions (the same at
        every step: ``progress`` is not used)."""
        if not len(items) == len(completions) == len(truncated):
            raise ValueError(
                f"score() got {len(items)} items, {len(completions)} completions, {len(truncated)} truncated flags"
            )
        codes = [extract_code(c) for c in completions]
        results = self._execute(items, codes)
        pairs = [(_inputs(item.meta), _outputs(item.meta["train"]), _outputs(item.meta["test"])) for item in items]
        evaluations = [evaluate(result, train, test) for result, (_, train, test) in zip(results, pairs)]
        # Copying shown outputs is paid as a valid program with every grid wrong (copying.py).
        verdicts = judge_copying(codes, pairs, results, evaluations, self.sandbox.run_many)
        evaluations = [apply_verdict(e, v) for e, v in zip(evaluations, verdicts)]
        rewards = [float(self.reward_fn(e)) for e in evaluations]
        metrics = step_metrics(evaluations)
        # Items repeat once per generation; count each prompt's skips once.
        skips = {item.uid: item.meta["skipped_long_prompts"] for item in items}
        counts = {"data/skipped_long_prompts": float(sum(skips.values())),
                  "arc/copy_reruns": float(sum(v.reruns for v in verdicts))}
        details = [
            {"uid": item.uid, "task_id": item.meta["task_id"], "reward": r, "truncated": bool(t), **e.to_dict()}
            for item, e, r, t in zip(items, evaluations, rewards, truncated)
        ]
        return Scores(rewards=rewards, components={self.reward_name: rewards}, metrics=metrics, details=details,
                      counts=counts)

    def close(self) -> None:
        """Shut the sandbox workers down; a later score() starts a new pool."""
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def _inputs(meta: dict[str, Any]) -> list[Grid]:
    return [pair["input"] for pair in (*meta["train"], *meta["test"])]


def _outputs(pairs: Sequence[dict[str, Grid]]) -> list[Grid]:
    return [pair["output"] for pair in pairs]


def _no_code_result(num_inputs: int) -> ExecutionResult:
    return ExecutionResult(outcome=Outcome.PARSE_ERROR, outputs=[None] * num_inputs, error=NO_CODE_ERROR, duration_s=0.0)
