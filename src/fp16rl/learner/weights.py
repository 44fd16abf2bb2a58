"""FP32 master weights, the trainer model's compute copy of them, and the optimizer over the masters.

With ``trainer_compute="half_copy"`` and a half trainer dtype, the model holds its trainable
weights cast to that dtype (it computes exactly as the sampler does) while AdamW updates FP32
masters: after backward the half gradients are copied up into the masters' ``.grad``, the loss
scaler unscales and checks them there, the optimizer steps the masters, and the masters are cast
back into the model. This is mixed precision with FP32 master weights as FSDP's ``param_dtype``
does it. Otherwise (FP32 training, or ``autocast``) the masters *are* the model's parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from fp16rl.model.islands import island_parameter_ids
from fp16rl.model.precision import PrecisionPolicy


# HF Trainer's rule for the parameters without weight decay (``transformers.Trainer.get_decay_parameter_names``):
# those inside an ``nn.LayerNorm`` or whose name matches one of these. Importing ``transformers.Trainer`` to call
# it would cost every run seconds of start-up (it loads accelerate, peft, bitsandbytes);
# tests/test_trainer_correctness.py checks this rule against Trainer's own on every tiny architecture.
NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that AdamW decays, by HF Trainer's rule."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_NAME_PATTERNS))


class MasterWeights:
    """The trainable parameters of ``model`` and their FP32 masters (the same tensors when no copy is kept)."""

    def __init__(self, model: nn.Module, policy: PrecisionPolicy, sharded: bool = False,
                 only: Callable[[str], bool] | None = None):
        """``sharded``: the model's parameters are FSDP2 shards kept in FP32 (``fp16rl.learner.fsdp``), gathered in
        the compute dtype by FSDP itself; then they are the masters and no copy is kept here. ``only``: the
        names of the trainable parameters that are these weights' (PPO's critic shares its model with the
        policy's trainable adapter)."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and (only is None or only(name))]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.is_copy = policy.weights_dtype != torch.float32 and not sharded
        self.sharded = sharded
        with torch.no_grad():
            if self.is_copy:
                self.masters = [nn.Parameter(p.detach().float().clone()) for p in self.params]
                islands = island_parameter_ids(model)  # FP32 islands keep an FP32 compute copy
                for p in self.params:
                    if id(p) not in islands:
                        p.data = p.data.to(policy.weights_dtype)
            else:
                for p in self.params:
                    if p.dtype != torch.float32:
                        p.data = p.data.float()
                self.masters = list(self.params)

    def named_masters(self) -> dict[str, torch.Tensor]:
        """Name -> FP32 master (what checkpoints store and the sampler is synced from)."""
        return dict(zip(self.names, self.masters))

    def full_masters(self) -> dict[str, torch.Tensor]:
        """``named_masters`` with sharded tensors made whole: every rank must call it (an all-gather)."""
        from fp16rl.learner.fsdp import full_tensors

        return full_tensors(self.named_masters())

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as HF Trainer builds them: no weight decay on biases and norm weights."""
        decay = set(decay_parameter_names(model))
        groups = [
            {"params": [m for n, m in zip(self.names, self.masters) if n in decay], "weight_decay": weight_decay},
            {"params": [m for n, m in zip(self.names, self.masters) if n not in decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def grads_to_masters(self) -> None:
        """Move the compute copy's gradients into the masters (upcast to FP32; inf/NaN survive the cast)."""
        if not self.is_copy:
            return
        for param, master in zip(self.params, self.masters):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Cast the (updated) masters into the model's compute copy."""
        if self.is_copy:
            for param, master in zip(self.params, self.masters):
                param.copy_(master)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Set the masters from a checkpoint's tensors (and the model from them)."""
        unexpected = sorted(set(state) - set(self.names))
        missing = sorted(set(self.names) - set(state))
        if unexpected or missing:
            raise ValueError(f"{source} does not match the model: "
                             + (f"unexpected weights {unexpected[:3]}" if unexpected else f"missing weights {missing[:3]}"))
        for name, master in zip(self.names, self.masters):
            if state[name].shape != master.shape:
                raise ValueError(f"{source}: weight {name} has shape {tuple(state[name].shape)}, "
                                 f"the model's is {tuple(master.shape)}")
            master.copy_(state[name])
        self.masters_to_model()

    def zero_grad(self) -> None:
        for tensor in (*self.params, *self.masters):
            tensor.grad = None


def make_optimizer(weights: MasterWeights, model: nn.Module, learning_rate: float, weight_decay: float,
                   more: tuple[MasterWeights, nn.Module] | None = None) -> torch.optim.AdamW:
    """AdamW over ``weights`` (and ``more``'s, PPO's critic: its groups follow, one optimizer and schedule).

    Fused (one kernel per parameter for the whole update, TRL's default ``adamw_torch_fused``) where
    the masters' device has the kernel: the per-operation loop reads and writes each moment several
    times, 0.22 s against 0.07 s for SmolLM2-135M's 135 M masters on one CPU core. Under the fp16
    GradScaler the fused kernel receives the scaler's ``found_inf`` and leaves an overflowed step's
    weights, moments and step count as they were, as the loop's skipped call does. FSDP's DTensor
    shards keep the loop: torch 2.13's fused step fails on them under the GradScaler (its ``found_inf``
    of shape [1] against the shards' step counts of shape []).
    """
    groups = weights.param_groups(model, weight_decay)
    if more is not None:
        groups += more[0].param_groups(more[1], weight_decay)
    if not weights.sharded:
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
        except RuntimeError:  # a device without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=learning_rate)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, optimizer_steps: int, warmup_ratio: float) -> Any:
    """The LR schedule over ``optimizer_steps`` (RL steps x num_iterations), warm-up included.

    It advances once per optimizer step that was taken: a step skipped for an fp16 overflow (or a
    non-finite gradient) does not move it, as in HF Trainer, so the weights see the whole schedule.
    """
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=math.ceil(warmup_ratio * optimizer_steps),
                         num_training_steps=optimizer_steps)
