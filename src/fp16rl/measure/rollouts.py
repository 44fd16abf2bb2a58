"""The measurement the trainer and the probe share.

``measure_rollouts`` is the heart of fp16rl: the sampler draws completions in its dtype and records
their logprobs mu; the trainer's model recomputes the same tokens in the trainer's compute path
(pi_old, ``TrainerForward``). ``Trainer.step`` and ``fp16rl probe`` both call it, so the probe measures
exactly what a run with the same options sees at its first step. Rows ``i*G .. i*G+G-1`` of the
measurement belong to prompt ``i``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fp16rl.learner.logprobs import LogitHead, completion_logprobs
from fp16rl.learner.distributed import DataParallel
from fp16rl.measure.vocab import VocabParity, vocab_parity_metrics
from fp16rl.model.forward import TokenBatch, build_token_batch
from fp16rl.model.precision import DtypeRecorder, PrecisionPolicy
from fp16rl.rollout.sampler import Rollouts, Sampler, SamplingParams


@dataclass(frozen=True)
class TrainerForward:
    """The trainer's compute path for the logprobs of a whole batch: the policy ``model`` with its ``head``,
    in micro-batches of ``rows`` completions, in the trainer's compute context (``policy.autocast``), under
    the caller's grad mode. ``run_backbone``: the data-parallel wrapper of ``model``'s backbone (FSDP's
    shards are only whole inside its forward); ``share_prompts``: each prompt computed once for its rows
    (``prompt_forward``)."""

    model: torch.nn.Module
    head: LogitHead
    policy: PrecisionPolicy
    temperature: float
    rows: int
    chunk_tokens: int
    run_backbone: Callable[..., Any] | None = None
    share_prompts: bool = False

    def logprobs(self, tokens: TokenBatch, with_entropy: bool = False,
                 vocab: VocabParity | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's token logprobs ``[N, C]`` (and entropy) of ``tokens``, through ``run_backbone``;
        ``vocab``: also the trainer's whole distributions at its sampled positions (``VocabParity.tap``)."""
        return self._logprobs(self.model, tokens, self.head, with_entropy, self.run_backbone, vocab)

    def score(self, model: torch.nn.Module, tokens: TokenBatch, head: LogitHead | None = None) -> torch.Tensor:
        """``model``'s token logprobs (the reference's: ``learner.reference.LogprobsFn``) in the same compute
        path, without entropy and not through the policy's wrapper; ``head``: ``model``'s own (None: the
        policy's)."""
        return self._logprobs(model, tokens, head or self.head, False, None)[0]

    def _logprobs(self, model: torch.nn.Module, tokens: TokenBatch, head: LogitHead, with_entropy: bool,
                  run_backbone: Callable[..., Any] | None,
                  vocab: VocabParity | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts, entropies = [], []
        with self.policy.autocast(tokens.input_ids.device.type):
            for begin in range(0, tokens.input_ids.shape[0], self.rows):
                logp, entropy = completion_logprobs(model, tokens.select(slice(begin, begin + self.rows)),
                                                    self.temperature, with_entropy, self.chunk_tokens, head,
                                                    run_backbone, self.share_prompts,
                                                    vocab.tap(begin) if vocab is not None else None)
                parts.append(logp)
                entropies.append(entropy)
        return torch.cat(parts), (torch.cat(entropies) if with_entropy else None)


@dataclass(frozen=True)
class RolloutRequest:
    """What the sampler draws: ``num_generations`` completions of each prompt with ``params``, the prompt
    in slot ``slots[i]`` drawing the noise of that slot (``Sampler.generate``); ``max_rows`` bounds the
    rows decoded at once; ``vocab_positions``: how many completion positions the full-vocabulary parity
    compares (``measure/vocab.py``; 0: none)."""

    prompt_ids: Sequence[Sequence[int]]
    num_generations: int
    params: SamplingParams
    seed: int
    slots: Sequence[int]
    max_rows: int | None = None
    vocab_positions: int = 0


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
    vocab: VocabParity | None = None  # full-vocabulary parity; its trainer side filled by the recompute or later

    def vocab_metrics(self, parallel: DataParallel) -> dict[str, float]:
        """``mismatch/vocab_*`` of the whole batch (every rank's part; a collective), none when off."""
        return vocab_parity_metrics(self.vocab, parallel)


def trainer_inputs(rollouts: Any, forward: TrainerForward, pad_token_id: int) -> tuple[TokenBatch, VocabParity | None]:
    """The sampled ``rollouts`` as the trainer's token batch on its device, and the full-vocabulary parity
    whose trainer side ``forward`` fills (None when the sampler kept no rows): what every measurement of a
    sampled batch starts from (``measure_rollouts``; ``training/pipeline.py`` for a stale batch)."""
    device = next(forward.model.parameters()).device
    tokens = build_token_batch(rollouts.prompt_ids, rollouts.num_generations, rollouts.completion_ids,
                               rollouts.completion_mask, pad_token_id).to(device)
    vocab = None if rollouts.vocab is None else VocabParity(
        rollouts.vocab.to(device), forward.head, forward.temperature, tokens.completion_ids)
    return tokens, vocab


@torch.no_grad()
def measure_rollouts(
    sampler: Sampler, request: RolloutRequest, forward: TrainerForward, pad_token_id: int, with_entropy: bool = False,
    should_stop: Callable[[], None] | None = None, watch: Callable[[torch.nn.Module], Any] | None = None,
    recompute: bool = True,
) -> Measurement:
    """Sample ``request`` with the sampler, then recompute the completions' token logprobs with the
    trainer's ``forward`` at the same weights; record what each engine computed in.

    ``watch(model)`` is an extra context for the recompute (the trainer polls Ctrl-C in it);
    ``should_stop`` is polled once per decoded token. ``recompute=False``: the caller takes pi_old from
    its training forward (``pi_old.py``); the measurement's ``old_logprobs``, ``entropy`` and observed
    trainer dtypes are None then.
    """
    start = time.perf_counter()
    rollouts = sampler.generate(request.prompt_ids, request.num_generations, request.params, seed=request.seed,
                                slots=request.slots, should_stop=should_stop, max_rows=request.max_rows,
                                vocab_positions=request.vocab_positions)
    sampled = time.perf_counter()
    model = forward.model
    tokens, vocab = trainer_inputs(rollouts, forward, pad_token_id)
    if not recompute:
        return Measurement(rollouts, tokens, None, None, {"sampler": rollouts.observed_dtype, "trainer": None},
                           sampled - start, 0.0, vocab)
    recorder = DtypeRecorder()
    with recorder.watch(model), (watch(model) if watch else contextlib.nullcontext()):
        old_logprobs, entropy = forward.logprobs(tokens, with_entropy, vocab)
    return Measurement(rollouts, tokens, old_logprobs, entropy,
                       {"sampler": rollouts.observed_dtype, "trainer": recorder.report()},
                       sampled - start, time.perf_counter() - sampled, vocab)
