"""One precision switch for both engines, and proof from the tensors that it took effect.

The sampler holds and computes in ``sampler_dtype`` (like vLLM). The trainer keeps FP32 master
weights for what it trains and computes under ``torch.autocast(trainer_dtype)``; FP16 training uses
dynamic loss scaling. ``DtypeRecorder`` observes what each engine actually computed in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


class PrecisionError(ValueError):
    """The engines' precisions disagree (or a dtype name is unknown)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` / ``"float16"`` / ``torch.float16`` -> ``torch.float16`` (likewise bf16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise PrecisionError(f"unknown dtype {name!r}; use one of float16, bfloat16, float32 (or fp16, bf16, fp32)")
    return DTYPE_ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PrecisionPolicy:
    """The declared precision of both engines and the loss-scaling settings that follow from it."""

    sampler_dtype: torch.dtype
    trainer_dtype: torch.dtype
    loss_scale_init: float = 2.0**16
    loss_scale_growth_interval: int = 400  # the paper's VeRL patch; torch's default is 2000

    @classmethod
    def from_options(
        cls,
        dtype: str | None,
        sampler_dtype: str | None = None,
        trainer_dtype: str | None = None,
        loss_scale_growth_interval: int = 400,
    ) -> "PrecisionPolicy":
        """``dtype`` sets both sides; ``sampler_dtype``/``trainer_dtype`` override one side (ablations)."""
        base = parse_dtype(dtype or "float32")
        return cls(
            sampler_dtype=parse_dtype(sampler_dtype) if sampler_dtype else base,
            trainer_dtype=parse_dtype(trainer_dtype) if trainer_dtype else base,
            loss_scale_growth_interval=loss_scale_growth_interval,
        )

    @property
    def is_ablation(self) -> bool:
        """True when the two engines are declared to differ on purpose."""
        return self.sampler_dtype != self.trainer_dtype

    @property
    def uses_loss_scaling(self) -> bool:
        return self.trainer_dtype == torch.float16

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The trainer's compute context: autocast to ``trainer_dtype`` (a no-op for float32)."""
        if self.trainer_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.trainer_dtype)

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler:
        """Dynamic loss scaler; disabled (a pass-through) unless the trainer computes in fp16."""
        return torch.amp.GradScaler(
            device_type,
            init_scale=self.loss_scale_init,
            growth_interval=self.loss_scale_growth_interval,
            enabled=self.uses_loss_scaling,
        )

    def describe(self) -> dict[str, str]:
        return {"sampler_dtype": dtype_name(self.sampler_dtype), "trainer_dtype": dtype_name(self.trainer_dtype)}


class DtypeRecorder:
    """Records the dtypes that ``nn.Linear`` layers of a model actually produced during a forward.

    Reading the config tells what was asked for; this tells what happened (a forgotten cast, an
    autocast that did not apply, a backend ignoring the dtype flag all show up here).
    """

    def __init__(self) -> None:
        self.linear_outputs: set[torch.dtype] = set()
        self.linear_weights: set[str] = set()

    @contextlib.contextmanager
    def watch(self, model: torch.nn.Module) -> Iterator["DtypeRecorder"]:
        def hook(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(output, torch.Tensor):
                self.linear_outputs.add(output.dtype)
                # bitsandbytes' 4-bit weights are uint8 storage with a ``quant_type`` ("nf4").
                self.linear_weights.add(getattr(module.weight, "quant_type", None) or dtype_name(module.weight.dtype))

        # nn.Linear and its subclasses (bitsandbytes' Linear4bit); peft's LoRA layers wrap these.
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def compute_dtype(self) -> str:
        """The single dtype the matmuls ran in, or a ``+``-joined list when they were mixed."""
        if not self.linear_outputs:
            return "unobserved"
        return "+".join(sorted(dtype_name(d) for d in self.linear_outputs))

    def report(self) -> dict[str, str]:
        return {
            "compute_dtype": self.compute_dtype(),
            "weight_dtypes": "+".join(sorted(self.linear_weights)) or "unobserved",
        }


def check_observed(policy: PrecisionPolicy, sampler: dict[str, str], trainer: dict[str, str]) -> dict:
    """Compare what each engine computed in with the policy; raise on an undeclared disagreement.

    Returns the precision report written to config.yaml.
    """
    expected_sampler, expected_trainer = dtype_name(policy.sampler_dtype), dtype_name(policy.trainer_dtype)
    problems = []
    if sampler["compute_dtype"] != expected_sampler:
        problems.append(f"sampler computed in {sampler['compute_dtype']}, expected {expected_sampler}")
    if trainer["compute_dtype"] != expected_trainer:
        problems.append(f"trainer computed in {trainer['compute_dtype']}, expected {expected_trainer}")
    if not policy.is_ablation and sampler["compute_dtype"] != trainer["compute_dtype"]:
        problems.append(
            f"sampler ({sampler['compute_dtype']}) and trainer ({trainer['compute_dtype']}) computed in different "
            "dtypes; set --sampler-dtype/--trainer-dtype explicitly if this ablation is intended"
        )
    if problems:
        raise PrecisionError("precision check failed: " + "; ".join(problems))
    return {
        "declared": policy.describe(),
        "observed": {"sampler": sampler, "trainer": trainer},
        "engines_agree": sampler["compute_dtype"] == trainer["compute_dtype"],
        "loss_scaling": policy.uses_loss_scaling,
        "loss_scale_growth_interval": policy.loss_scale_growth_interval,
    }
