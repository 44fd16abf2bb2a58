"""Half-precision linear layers on CPUs that have no half-precision matmul kernel, computed as that
kernel would compute them, with float32's GEMM.

Why: without oneDNN's bfloat16 path (AVX-512 or AMX) or its float16 path (AVX512-FP16 or AMX-FP16),
torch multiplies half matrices with a fallback kernel that widens each element to float32, sums the
products in float32 and rounds each output once, one element at a time: 10-50x slower than a float32
GEMM (bench/RESULTS.md, "Half-precision linears on a CPU without a half kernel": a SmolLM2-135M
training forward and backward in bfloat16 took 12x longer than with this module). ``widened_linear``
does that same arithmetic at float32 speed:

    y = round_half( float32(x) @ float32(W)^T + float32(b) )

in the forward, and in the backward ``dx = round_half(float32(dy) @ float32(W))``,
``dW = round_half(float32(dy)^T @ float32(x))``, ``db = round_half(sum float32(dy))``. Widening a half
number to float32 is exact, so the only difference from the fallback kernel is the order of the
float32 sums: measured, 99.7% or more of the outputs are bitwise equal, the rest one half-precision
unit apart, with the same error against float64 (tests/test_half_matmul.py).

Both engines hold these layers: ``widen_linears`` swaps the class of every plain ``nn.Linear`` when
the model is loaded (after LoRA for its adapters), the sampler's copy inherits the class, and the
fast decoder calls ``widened_with`` (the same numbers, weights widened once per call); so the sampler and the trainer still
compute alike. Under CPU autocast the layer casts its inputs to the autocast dtype first, as autocast
does for ``F.linear``. Float32 layers, GPUs, and dtypes the CPU has a kernel for run ``F.linear``
itself; a CPU with both kernels (Intel Sapphire Rapids) swaps nothing. Attention's matmuls and the
elementwise operations stay torch's own.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["WidenedLinear", "emulated_dtypes", "half_matmul_path", "widen_linears", "widened_linear", "widened_with"]

# The checks torch's CPU matmul itself makes to choose oneDNN for a half dtype (aten's
# ``use_mkldnn_matmul``); without it the dtype falls back to the element-by-element kernel.
_ONEDNN_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@lru_cache(maxsize=1)
def emulated_dtypes() -> frozenset[torch.dtype]:
    """The half dtypes this CPU has no fast matmul kernel for (fixed per machine, so runs that resume
    on it compute as before)."""
    emulated = set()
    for dtype, name in _ONEDNN_CHECKS.items():
        check = getattr(torch.ops.mkldnn, name, None)
        if not (torch.backends.mkldnn.is_available() and check is not None and bool(check())):
            emulated.add(dtype)
    return frozenset(emulated)


def half_matmul_path() -> str:
    """How this CPU's half linears compute, as runs record it: "native", or which dtypes are widened."""
    widened = sorted(str(dtype).removeprefix("torch.") for dtype in emulated_dtypes())
    return f"widened to float32: {', '.join(widened)}" if widened else "native"


class _WidenedLinearFunction(torch.autograd.Function):
    """``F.linear`` of half tensors with float32 products and sums, rounded once (the module's formulas)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        wide = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (wide @ weight.float()).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (wide.t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = wide.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on a CPU, in a half dtype it has no kernel for, computed widened to
    float32 and rounded once (the module's formulas). Anything else is ``F.linear`` itself."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype not in emulated_dtypes() or torch.float64 in (x.dtype, weight.dtype):
            return F.linear(x, weight, bias)  # autocast leaves float64 alone; F.linear does what it does
        # What autocast does for F.linear: every floating input cast to its dtype, then the half matmul.
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _widened(x, weight, bias)
    if x.dtype not in emulated_dtypes() or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)  # float32, a native kernel, or mixed dtypes (F.linear's own error)
    return _widened(x, weight, bias)


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_graph:
        return _WidenedLinearFunction.apply(x, weight, bias)
    return _forward(x, weight, bias)  # decoding: no autograd.Function bookkeeping per call


def widened_with(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> widened_linear(x, weight, bias)`` for a loop in which the weights stay as they are (the fast
    decoder's, built for one ``generate`` call): their float32 copies are made once, not at every token,
    which would stream the weights through memory three times a step. The copies hold twice the half
    weights' memory while the decoder lives (one ``generate`` call). The same numbers as
    ``widened_linear``; inputs of another dtype, or under autocast, go to ``widened_linear`` itself."""
    dtype = weight.dtype
    if weight.device.type != "cpu" or dtype not in emulated_dtypes() or (bias is not None and bias.dtype != dtype):
        return partial(widened_linear, weight=weight, bias=bias)
    wide_weight = weight.detach().float()
    wide_bias = None if bias is None else bias.detach().float()

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return widened_linear(x, weight, bias)
        return F.linear(x.float(), wide_weight, wide_bias).to(dtype)

    return linear


class WidenedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward is ``widened_linear``: the same parameters, state dict and hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return widened_linear(x, self.weight, self.bias)


def widen_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Make every plain ``nn.Linear`` of ``model`` held on the CPU a ``WidenedLinear`` (in place; returned
    for chaining) where this CPU lacks a half kernel; nothing where it has both, nothing on a GPU. Idempotent."""
    if emulated_dtypes():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
                module.__class__ = WidenedLinear
    return model
