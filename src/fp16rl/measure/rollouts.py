"""What one generation batch is, and the measurement the trainer and the probe share.

``measure_rollouts`` is the heart of fp16rl: the sampler draws completions in its dtype and records
their logprobs mu; the trainer's model recomputes the same tokens in the trainer's compute path
(pi_old). ``Trainer.step`` and ``fp16rl probe`` both call it, so the probe measures exactly what a
run with the same options sees at its first step. ``RolloutBatch`` then carries every per-token
tensor of the step to the loss, row-aligned (rows ``i*G .. i*G+G-1`` belong to prompt ``i``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fp16rl.learner.logprobs import LogitHead, completion_logprobs

from fp16rl.model.forward import TokenBatch, build_token_batch
from fp16rl.model.precision import DtypeRecorder, PrecisionPolicy
from fp16rl.rollout.sampler import Rollouts, Sampler, SamplingParams


def trainer_logprobs(
    model: torch.nn.Module, tokens: TokenBatch, policy: PrecisionPolicy, head: LogitHead, temperature: float,
    micro_batch: int, chunk_tokens: int, with_entropy: bool = False, run_backbone: Callable[..., Any] | None = None,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trainer's logprobs of a whole batch in micro-batches of ``micro_batch`` rows, in the
    trainer's compute context (autocast or none), under the caller's grad mode. ``run_backbone``: the
    data-parallel wrapper of ``model``'s backbone (FSDP's shards are only whole inside its forward);
    ``share_prompts``: each prompt computed once for its rows (``prompt_forward``)."""
    device_type = tokens.input_ids.device.type
    parts, entropies = [], []
    with policy.autocast(device_type):
        for begin in range(0, tokens.input_ids.shape[0], micro_batch):
            logp, entropy = completion_logprobs(model, tokens.select(slice(begin, begin + micro_batch)), temperature,
                                                with_entropy, chunk_tokens, head, run_backbone, share_prompts)
            parts.append(logp)
            entropies.append(entropy)
    return torch.cat(parts), (torch.cat(entropies) if with_entropy else None)


@dataclass
class Measurement:
    """Rollouts with both engines' view of their tokens: mu from the sampler, pi_old from the trainer."""

    rollouts: Rollouts
    tokens: TokenBatch  # on the trainer's device
    old_logprobs: torch.Tensor | None  # [N, C] fp32, 0 where masked (None: from the training forward)
    entropy: torch.Tensor | None  # [N, C] of pi_old's distribution
    observed: dict[str, dict[str, str]]  # {"sampler": ..., "trainer": ...} from DtypeRecorder
    sample_s: float
    recompute_s: float


@torch.no_grad()
def measure_rollouts(
    sampler: Sampler, model: torch.nn.Module, head: LogitHead, policy: PrecisionPolicy,
    prompt_ids: Sequence[Sequence[int]], num_generations: int, params: SamplingParams, seed: int,
    slots: Sequence[int], micro_batch: int, chunk_tokens: int, pad_token_id: int, with_entropy: bool = False,
    should_stop: Callable[[], None] | None = None, watch: Callable[[torch.nn.Module], Any] | None = None,
    max_rows: int | None = None, run_backbone: Callable[..., Any] | None = None, recompute: bool = True,
    share_prompts: bool = False,
) -> Measurement:
    """Sample ``num_generations`` completions per prompt with the sampler, then recompute their token
    logprobs with the trainer's ``model`` at the same weights; record what each engine computed in.

    ``watch(model)`` is an extra context for the recompute (the trainer polls Ctrl-C in it); ``max_rows``
    bounds the rows the sampler decodes at once and ``micro_batch`` those the trainer recomputes at once.
    ``recompute=False``: the caller takes pi_old from its training forward (``pi_old.py``); the
    measurement's ``old_logprobs``, ``entropy`` and observed trainer dtypes are None then.
    """
    start = time.perf_counter()
    rollouts = sampler.generate(prompt_ids, num_generations, params, seed=seed, slots=slots, should_stop=should_stop,
                                max_rows=max_rows)
    sampled = time.perf_counter()
    device = next(model.parameters()).device
    tokens = build_token_batch(rollouts.prompt_ids, num_generations, rollouts.completion_ids,
                               rollouts.completion_mask, pad_token_id).to(device)
    if not recompute:
        return Measurement(rollouts, tokens, None, None, {"sampler": rollouts.observed_dtype, "trainer": None},
                           sampled - start, 0.0)
    recorder = DtypeRecorder()
    with recorder.watch(model), (watch(model) if watch else contextlib.nullcontext()):
        old_logprobs, entropy = trainer_logprobs(model, tokens, policy, head, params.temperature, micro_batch,
                                                 chunk_tokens, with_entropy, run_backbone, share_prompts)
    return Measurement(rollouts, tokens, old_logprobs, entropy,
                       {"sampler": rollouts.observed_dtype, "trainer": recorder.report()},
                       sampled - start, time.perf_counter() - sampled)
