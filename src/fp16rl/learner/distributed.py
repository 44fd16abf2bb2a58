"""Data-parallel training on ``torch.distributed``: ranks, prompt ownership, exact reductions, DDP.

``torchrun --nproc-per-node N -m fp16rl train ...`` (or ``accelerate launch``) starts N processes and
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; fp16rl manages no process of its own. Each rank owns
whole prompt groups (a contiguous slice of the step's prompts, all G completions of each), samples
them with the sampler's per-prompt seeds (so prompt i's completions do not depend on the world
size) and scores them. Whatever a metric or an advantage needs from the other ranks is *gathered*,
not averaged: every rank then computes the metrics of the whole generation batch exactly as one
process would (means of means never appear). The gradient is the sum over ranks of each rank's
share of the globally normalised loss: DDP with a comm hook that sums instead of averaging (or, with
``--fsdp``, FSDP2's reduce-scatter as a sum: ``fp16rl.learner.fsdp``), so ``dapo``/``bnpo``/``grpo``/``dr_grpo``
normalise by the global token and row counts. An fp16
overflow on any rank reaches every rank's gradient through that sum, so every rank's GradScaler
skips the same step.

Rank 0 alone plans the run folder, writes metrics, samples, checkpoints and the summary, and reads a
checkpoint when resuming (then broadcasts it): the output folder need exist only on its machine.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fp16rl.core.errors import ConfigError, UserError
from fp16rl.core.ranks import launched_ranks
from fp16rl.core.scores import Scores

T = TypeVar("T")


def _sum_gradients(process_group, bucket):  # noqa: ANN001, ANN201 - DDP checks real (not string) annotations
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size). Each rank's loss is
    already its share of the globally normalised loss, so the sum is the one-process gradient."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class _Backbone(nn.Module):
    """The decoder stack as DDP's module. Its parameters are all the model's, so DDP also reduces the
    gradients of the output head, which runs outside this forward (in ``completion_logprobs``'s chunks)
    but in the same backward."""

    def __init__(self, model: nn.Module, uniform: bool = False):
        super().__init__()
        self.model = model
        self.uniform = uniform  # FSDP: the same calls of the stack on every rank (``completion_hidden``)

    def forward(self, tokens: Any, share_prompts: bool = False) -> torch.Tensor:  # tokens: a TokenBatch
        """``completion_hidden`` of ``tokens``: one DDP/FSDP forward even when the prompt pass and the
        completion pass are two calls of the stack (``prompt_forward``)."""
        from fp16rl.model.forward import backbone
        from fp16rl.learner.prompt_forward import completion_hidden

        return completion_hidden(backbone(self.model), tokens, share_prompts, uniform=self.uniform)


@dataclass
class WholeBatch:
    """Every rank's part of a generation batch, in rank order (this rank's own batch when alone): what
    advantages and metrics are computed from, so they are the one-process values exactly."""

    scores: Scores
    sampler_logprobs: torch.Tensor  # [N, C] mu
    behaviour_logprobs: torch.Tensor  # [N, C] the processed distribution sampled (top-p, top-k, penalty)
    kept_mass: torch.Tensor  # [N, C] the unprocessed mass the processing kept
    old_logprobs: torch.Tensor | None  # [N, C] pi_old (None until the training forward gives it: pi_old.py)
    completion_mask: torch.Tensor  # [N, C] bool
    entropy: torch.Tensor | None  # [N, C] (as old_logprobs)
    truncated: list[bool]
    token_lists: list[list[int]]
    rows: slice  # this rank's rows

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor(self.scores.rewards, dtype=torch.float32)


@dataclass
class DataParallel:
    """This process's place among the ranks, and the collectives the training loop uses.

    With one process every method is the identity (no process group is needed or created).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    _comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls, device_type: str) -> "DataParallel":
        """Join the process group a launcher described (nccl on CUDA, gloo on CPU); one rank when none."""
        world = launched_ranks()
        if world == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not dist.is_initialized()
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        if owns:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        comm = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns, comm)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when training on CUDA with several ranks."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def shard(self, count: int) -> range:
        """The indices (of ``count`` prompts) this rank owns: a contiguous slice, rank order."""
        per_rank = count // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    # --- collectives (identity with one rank) ---------------------------------------------------

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, in float64 (exact for counts)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def gather_rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Concatenate every rank's ``[n, ...]`` tensor along rows, in rank order; a second dimension that
        differs between ranks (completion lengths) is right-padded with zeros/False to the widest. None
        (on every rank alike) stays None."""
        if not self.enabled or tensor is None:
            return tensor
        device, dtype = tensor.device, tensor.dtype
        local = tensor.to(self._comm_device)
        if dtype == torch.bool:  # gloo reduces no bool tensors
            local = local.to(torch.uint8)
        if local.dim() > 1:
            width = int(max(self.gather_objects(local.shape[1])))
            local = torch.nn.functional.pad(local, (0, width - local.shape[1]))
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts).to(device=device, dtype=dtype)

    def gather_objects(self, value: T) -> list[T]:
        """Every rank's picklable ``value``, in rank order."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device if self._comm_device.type == "cuda" else None)
        return box[0]

    def whole_batch(self, scores: Scores, sampler_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                    kept_mass: torch.Tensor, old_logprobs: torch.Tensor | None, completion_mask: torch.Tensor,
                    entropy: torch.Tensor | None, truncated: Sequence[bool], token_lists: Sequence[list[int]]
                    ) -> WholeBatch:
        """Gather this rank's part of the step's batch with every other rank's (None stays None)."""
        rows = len(scores.rewards)
        if not self.enabled:
            return WholeBatch(scores, sampler_logprobs, behaviour_logprobs, kept_mass, old_logprobs, completion_mask,
                              entropy, list(truncated), list(token_lists), slice(0, rows))
        parts = self.gather_objects((scores, list(truncated), [list(t) for t in token_lists]))
        return WholeBatch(
            scores=Scores.merge([p[0] for p in parts]),
            sampler_logprobs=self.gather_rows(sampler_logprobs), behaviour_logprobs=self.gather_rows(behaviour_logprobs),
            kept_mass=self.gather_rows(kept_mass), old_logprobs=self.gather_rows(old_logprobs),
            completion_mask=self.gather_rows(completion_mask), entropy=self.gather_rows(entropy),
            truncated=[t for p in parts for t in p[1]], token_lists=[t for p in parts for t in p[2]],
            rows=slice(self.rank * rows, (self.rank + 1) * rows))

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 alone and hand its result (or its refusal) to every rank."""
        if not self.enabled:
            return work()
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except UserError as err:
                outcome = ("error", err)
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def agree(self, error: BaseException | None) -> None:
        """A barrier that fails together: when set-up failed on any rank, every rank raises (the failing
        rank its own error, the others a ``ConfigError`` naming it), so none waits forever in a collective."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        reports = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, report in enumerate(reports):
            if report is not None:
                raise ConfigError(f"rank {rank} failed to start: {report}")

    def wrap(self, model: nn.Module, fsdp: bool = False, param_dtype: torch.dtype | None = None) -> nn.Module | None:
        """The module to call in place of ``model``'s backbone in every forward of the policy (None with
        one rank): DDP over the decoder stack, or with ``fsdp`` the stack sharded by FSDP2
        (``fp16rl.learner.fsdp``; ``param_dtype`` is what the shards are gathered in for compute)."""
        if not self.enabled:
            return None
        if fsdp:
            from fp16rl.learner.fsdp import shard_backbone
            from fp16rl.model.forward import backbone

            stacks = [child for child in backbone(model).children() if isinstance(child, nn.ModuleList)]
            return shard_backbone(_Backbone(model, uniform=True), list(stacks[0]) if stacks else [], param_dtype)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self._comm_device.type == "cuda" else None
        wrapped = DistributedDataParallel(_Backbone(model), device_ids=device_ids, forward_sync_buffers=False)
        wrapped.register_comm_hook(None, _sum_gradients)
        return wrapped

    def close(self) -> None:
        """Leave the process group this object joined (a launcher-made group is left to its owner).

        Drop the module ``wrap`` returned first: DDP's Reducer holds the group, and a gloo group freed
        by the Reducer's destructor joins its worker threads with the GIL held, a deadlock whenever one
        of them is still releasing a finished collective's tensors (which needs the GIL). Freed here, by
        ``destroy_process_group``, its destructor releases the GIL. (``gc.collect``: DDP's hooks make
        reference cycles.)"""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
