"""Full fine-tuning sharded over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Why: with DDP every rank holds the whole FP32 masters, their gradients and AdamW's two moments, 16
bytes per parameter (128 GB for an 8B model); ``--fsdp`` keeps 16/N per rank. Each decoder layer is
one FSDP unit and the backbone (embeddings, final norm, output head) the root unit.

How it maps onto fp16rl's precision contract:

* the sharded parameters *are* the FP32 masters; ``MixedPrecisionPolicy(param_dtype=trainer dtype)``
  all-gathers them cast to the trainer dtype for each forward and backward, which is exactly the
  ``half_copy`` compute path (every weight rounded once from its FP32 master, as the sampler's copy
  is); with ``--trainer-compute autocast`` they are gathered in FP32 and autocast runs as without FSDP;
* gradients are reduce-scattered in FP32 as a SUM (``set_gradient_divide_factor(1)``): each rank's
  loss is already its share of the globally normalised loss, as with fp16rl's DDP comm hook;
* the loss scaler is ``ShardedGradScaler``: a rank whose gradient shard holds an inf/NaN tells the
  others (an all-reduce of ``found_inf``), so an overflow anywhere skips the step on every rank;
* the sampler, each rank's own full copy, is synced from ``full_tensors`` of the masters (an
  all-gather), and checkpoints hold full tensors in the one-process format (``full_optimizer_state``),
  so a checkpoint resumes with or without FSDP; ``shard_optimizer_state`` splits one back.

The output head runs outside the backbone's forward, in chunks (``completion_logprobs``): it belongs
to the root unit, which FSDP2 does not reshard after forward, so the chunks use the gathered weight
and its gradient is reduced with the root's at the end of backward (tied embeddings included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_backbone(root: nn.Module, layers: list[nn.Module], param_dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` each decoder layer, then ``root`` (the module whose forward runs the backbone and
    whose parameters are all the model's); returns ``root``, now an FSDP module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    for module in (*layers, root):
        module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is its share of the global one
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return root


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather every rank must join), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full_tensor`` of every value, in the dict's order (the same on every rank)."""
    return {name: full_tensor(t) for name, t in named.items()}


def full_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` over sharded parameters with every state tensor made whole: the
    format of a one-process optimizer (parameters keyed by their index, as in ``param_groups``)."""
    return {"state": {index: {key: full_tensor(value) if isinstance(value, torch.Tensor) else value
                              for key, value in state.items()}
                      for index, state in sorted(state_dict["state"].items())},
            "param_groups": state_dict["param_groups"]}


def shard_optimizer_state(state_dict: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The inverse of ``full_optimizer_state`` for an optimizer over ``params``, listed group after group
    as ``param_groups`` holds them (the numbering of ``state``): each state tensor shaped as its
    parameter is split as the parameter is; scalars (AdamW's ``step``) stay whole. Every rank must pass
    the same full tensors."""
    sharded: dict[int, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        param = params[int(index)]
        if any(isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape for v in state.values()):
            raise ValueError(f"optimizer state {index} has shape {[tuple(v.shape) for v in state.values()]}, "
                             f"its parameter {tuple(param.shape)}")
        sharded[index] = {
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in state.items()
        }
    return {"state": sharded, "param_groups": state_dict["param_groups"]}
