"""One precision switch for both engines, and proof from the tensors that it took effect.

The sampler holds and computes in ``sampler_dtype`` (like vLLM). The trainer keeps FP32 master
weights for what it trains; how it computes is ``trainer_compute``:

* ``half_copy`` (default): the model's trainable weights are a copy of the masters cast to
  ``trainer_dtype`` and the forward and backward run on it without autocast, as FSDP does with
  ``param_dtype``; embeddings, norms, residual stream and logits are then in the same dtype as
  in the sampler, so the two engines differ in kernels and batch shapes only.
* ``autocast``: FP32 trainable weights under ``torch.autocast(trainer_dtype)`` (the usual AMP).
  In full fine-tuning the embeddings, norms and residual stream then stay FP32, a difference from
  the sampler that is declared, recorded and measured rather than refused.

FP16 training uses dynamic loss scaling. ``DtypeRecorder`` observes what each engine actually
computed in: the matmul outputs, the residual stream (decoder-layer outputs) and the logits.

``fp32_modules`` declares FP32 islands (``fp16rl.model.islands``): modules both engines keep in FP32
weights and arithmetic inside a half-precision model; the recorder observes them apart from the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from fp16rl.config.dtypes import canonical_dtype
from fp16rl.core.errors import PrecisionError
from fp16rl.model.islands import describe_islands, island_modules

__all__ = ["PrecisionError", "PrecisionPolicy", "DtypeRecorder", "check_observed", "parse_dtype", "dtype_name"]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` / ``"float16"`` / ``torch.float16`` -> ``torch.float16`` (likewise bf16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, canonical_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PrecisionPolicy:
    """The declared precision of both engines and the loss-scaling settings that follow from it."""

    sampler_dtype: torch.dtype
    trainer_dtype: torch.dtype
    trainer_compute: str = "half_copy"  # half_copy | autocast (see the module docstring)
    loss_scale_init: float = 2.0**16
    loss_scale_growth_interval: int = 400  # the paper's VeRL patch; torch's default is 2000
    # FP32 islands, as --fp32-modules names them (norms, head, module name patterns); resolved on the model
    # by ``islands.resolve_islands`` and held by both engines.
    fp32_modules: tuple[str, ...] = ()

    @classmethod
    def from_options(
        cls,
        dtype: str | None,
        sampler_dtype: str | None = None,
        trainer_dtype: str | None = None,
        loss_scale_growth_interval: int = 400,
        trainer_compute: str = "half_copy",
        fp32_modules: Sequence[str] = (),
    ) -> "PrecisionPolicy":
        """``dtype`` sets both sides; ``sampler_dtype``/``trainer_dtype`` override one side (ablations)."""
        base = parse_dtype(dtype or "float32")
        return cls(
            sampler_dtype=parse_dtype(sampler_dtype) if sampler_dtype else base,
            trainer_dtype=parse_dtype(trainer_dtype) if trainer_dtype else base,
            trainer_compute=trainer_compute,
            loss_scale_growth_interval=loss_scale_growth_interval,
            fp32_modules=tuple(fp32_modules),
        )

    @property
    def is_ablation(self) -> bool:
        """True when the two engines are declared to differ on purpose."""
        return self.sampler_dtype != self.trainer_dtype

    @property
    def uses_autocast(self) -> bool:
        return self.trainer_compute == "autocast" and self.trainer_dtype != torch.float32

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the trainable weights the trainer's model computes with (masters stay FP32)."""
        return torch.float32 if self.trainer_compute == "autocast" else self.trainer_dtype

    @property
    def uses_loss_scaling(self) -> bool:
        return self.trainer_dtype == torch.float16

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The trainer's compute context: autocast for ``trainer_compute="autocast"``, else nothing."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.trainer_dtype)

    def grad_scaler(self, device_type: str, sharded: bool = False) -> torch.amp.GradScaler:
        """Dynamic loss scaler; disabled (a pass-through) unless the trainer computes in fp16. ``sharded``
        (FSDP): ``ShardedGradScaler``, whose overflow check is all-reduced over the ranks, since each
        rank sees only its shard of the gradient."""
        scaler_class = torch.amp.GradScaler
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as scaler_class
        return scaler_class(
            device_type,
            init_scale=self.loss_scale_init,
            growth_interval=self.loss_scale_growth_interval,
            enabled=self.uses_loss_scaling,
        )

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"sampler_dtype": dtype_name(self.sampler_dtype),
                                     "trainer_dtype": dtype_name(self.trainer_dtype),
                                     "trainer_compute": self.trainer_compute}
        if self.fp32_modules:
            described["fp32_modules"] = list(self.fp32_modules)
        return described


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class DtypeRecorder:
    """Records the dtypes a model actually produced during a forward.

    Reading the config tells what was asked for; this tells what happened (a forgotten cast, an
    autocast that did not apply, a residual stream left in FP32, a backend ignoring the dtype flag).
    Observed: every ``nn.Linear`` output (the matmuls) and weight, every decoder layer's output (the
    residual stream) and the output embedding's output (the logits). FP32 islands are observed apart:
    their units' outputs before rounding back (``island_dtype``) and weights, not among the matmuls.
    """

    def __init__(self) -> None:
        self.linear_outputs: set[torch.dtype] = set()
        self.linear_weights: set[str] = set()
        self.residual: set[torch.dtype] = set()
        self.logits: set[torch.dtype] = set()
        self.island_outputs: set[torch.dtype] = set()
        self.island_weights: set[str] = set()
        self.island_names: list[str] = []
        self.head_island = False

    @contextlib.contextmanager
    def watch(self, model: torch.nn.Module) -> Iterator["DtypeRecorder"]:
        def linear_hook(module: torch.nn.Module, _inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                self.linear_outputs.add(output.dtype)
                # bitsandbytes' 4-bit weights are uint8 storage with a ``quant_type`` ("nf4").
                self.linear_weights.add(getattr(module.weight, "quant_type", None) or dtype_name(module.weight.dtype))

        def record(into: set[torch.dtype]):
            def hook(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
                tensor = _first_tensor(output)
                if tensor is not None:
                    into.add(tensor.dtype)
            return hook

        handles = []
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        islands = island_modules(model)
        inside = {id(m) for unit in islands.values() for m in unit.modules()}
        for module in model.modules():
            # nn.Linear and its subclasses (bitsandbytes' Linear4bit); peft's LoRA layers wrap these.
            if isinstance(module, torch.nn.Linear) and id(module) not in inside:
                handles.append(module.register_forward_hook(linear_hook))
            if type(module).__name__.endswith("DecoderLayer"):
                handles.append(module.register_forward_hook(record(self.residual)))
        for unit in islands.values():  # prepended: the output before the island rounds it back
            handles.append(unit.register_forward_hook(record(self.island_outputs), prepend=True))
            self.island_weights.update(dtype_name(p.dtype) for p in unit.parameters() if p.is_floating_point())
        self.island_names = sorted(islands)
        self.head_island = head is not None and any(unit is head for unit in islands.values())
        if head is not None:
            handles.append(head.register_forward_hook(record(self.logits)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _joined(dtypes: set[torch.dtype]) -> str:
        """The single dtype observed, or a ``+``-joined list when they were mixed."""
        return "+".join(sorted(dtype_name(d) for d in dtypes)) or "unobserved"

    def compute_dtype(self) -> str:
        return self._joined(self.linear_outputs)

    def report(self) -> dict[str, str]:
        report = {
            "compute_dtype": self.compute_dtype(),
            "residual_dtype": self._joined(self.residual),
            "logits_dtype": self._joined(self.logits),
            "weight_dtypes": "+".join(sorted(self.linear_weights)) or "unobserved",
        }
        if self.island_names:  # only with islands: the report of a run without them is unchanged
            report.update({"island_dtype": self._joined(self.island_outputs),
                           "island_weight_dtypes": "+".join(sorted(self.island_weights)),
                           "island_modules": describe_islands(self.island_names),
                           "island_head": str(self.head_island).lower()})
        return report


def check_observed(policy: PrecisionPolicy, sampler: dict[str, str], trainer: dict[str, str],
                   full_finetune: bool = True) -> dict:
    """Compare what each engine computed in with the policy; raise on an undeclared disagreement.

    Expected: both engines' matmuls and logits in their declared dtype; the residual stream in the
    declared dtype too, except the trainer's under ``autocast`` in full fine-tuning (FP32, declared).
    FP32 islands (``policy.fp32_modules``): both engines hold the same ones and compute them in FP32; an
    FP32 head's logits are FP32. Returns the precision report written to config.yaml.
    """
    sampler_dtype, trainer_dtype = dtype_name(policy.sampler_dtype), dtype_name(policy.trainer_dtype)
    trainer_residual = "float32" if policy.uses_autocast and full_finetune else trainer_dtype
    expected = {
        ("sampler", "compute_dtype"): sampler_dtype, ("sampler", "residual_dtype"): sampler_dtype,
        ("sampler", "logits_dtype"): sampler_dtype, ("trainer", "compute_dtype"): trainer_dtype,
        ("trainer", "residual_dtype"): trainer_residual, ("trainer", "logits_dtype"): trainer_dtype,
    }
    observed = {"sampler": sampler, "trainer": trainer}
    for engine, report in observed.items():
        if report.get("island_head") == "true":
            expected[(engine, "logits_dtype")] = "float32"
    problems = _island_problems(policy, observed)
    for (engine, key), want in expected.items():
        got = observed[engine].get(key, "unobserved")
        if got != "unobserved" and got != want:
            what = key.removesuffix("_dtype").replace("compute", "matmuls")
            problems.append(f"{engine} {what} computed in {got}, expected {want}")
    if problems:
        raise PrecisionError("precision check failed: " + "; ".join(problems) + (
            "" if policy.is_ablation else "; set --sampler-dtype/--trainer-dtype explicitly if an ablation is intended"))
    agree = all(sampler.get(k) == trainer.get(k) for k in ("compute_dtype", "residual_dtype", "logits_dtype"))
    report = {
        "declared": policy.describe(),
        "observed": {"sampler": sampler, "trainer": trainer},
        "engines_agree": agree,
        "loss_scaling": policy.uses_loss_scaling,
        "loss_scale_growth_interval": policy.loss_scale_growth_interval,
    }
    if policy.fp32_modules:
        report["fp32_islands"] = {"requested": list(policy.fp32_modules), "modules": trainer.get("island_modules"),
                                  "sampler": sampler.get("island_dtype"), "trainer": trainer.get("island_dtype")}
    return report


def _island_problems(policy: PrecisionPolicy, observed: dict[str, dict[str, str]]) -> list[str]:
    """Islands that are not what the policy declares: missing in an engine, not the same in both, or
    not computed in FP32 (a unit an engine cast or ran under autocast)."""
    if not policy.fp32_modules:
        return [f"{engine} holds undeclared fp32 islands ({report['island_modules']})"
                for engine, report in observed.items() if report and report.get("island_modules")]
    problems = []
    for engine, report in observed.items():
        if not report:
            continue
        got = report.get("island_dtype", "unobserved")
        if "island_modules" not in report:
            problems.append(f"{engine} holds none of the declared fp32 islands {list(policy.fp32_modules)}")
        elif got not in ("float32", "unobserved") or report.get("island_weight_dtypes") != "float32":
            problems.append(f"{engine} fp32 islands computed in {got} with weights in "
                            f"{report.get('island_weight_dtypes')}, expected float32")
    modules = {report.get("island_modules") for report in observed.values() if report}
    if len(modules) > 1:
        problems.append(f"the engines hold different fp32 islands: sampler {observed['sampler'].get('island_modules')}, "
                        f"trainer {observed['trainer'].get('island_modules')}")
    return problems
