"""``fp16rl probe``: how large is the sampler/trainer mismatch of *this* model in bf16 vs fp16, without training.

For each (dtype, attention, batch size) configuration the real sampler draws completions and records
their token logprobs mu; the trainer's model, built as a run with the same options builds it,
recomputes the same tokens (pi_old) through ``fp16rl.measure.rollouts.measure_rollouts``, the function
every training step calls. The difference is exactly what a training run in that configuration sees at step 1,
before any update makes it grow.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fp16rl.measure.rollouts import RolloutRequest, TrainerForward, measure_rollouts
from fp16rl.measure.vocab import PositionStats, concatenate, vocab_strata
from fp16rl.model.hardware import auto_threads
from fp16rl.learner.logprobs import LogitHead
from fp16rl.algo.mismatch import mismatch_metrics, vocab_metrics
from fp16rl.model.loading import (LoraSettings, load_model, load_tokenizer, load_trainer_model, model_folder, resolve_device,
                           stop_token_ids)
from fp16rl.model.precision import PrecisionPolicy, check_observed
from fp16rl.probe.range_check import fp16_range_check
from fp16rl.probe.settings import BUILTIN_PROMPTS, ProbeSettings, encode_prompts, read_prompt_texts
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.core.seeds import derived_seed
from fp16rl.runs.tracking import Progress
from fp16rl.model.hardware import library_versions
from fp16rl.learner.weights import MasterWeights


@dataclass
class ConfigResult:
    """One configuration's metrics plus the raw per-token/per-sequence values the figures need."""

    dtype: str
    attn: str
    batch_size: int
    metrics: dict[str, float]
    observed: dict[str, Any]
    sampler_logprobs: torch.Tensor = field(repr=False)  # [T] real completion tokens, flattened
    trainer_logprobs: torch.Tensor = field(repr=False)  # [T]
    seq_log_ratio: torch.Tensor = field(repr=False)  # [N] sum_t (lpi - lmu) per completion
    seq_lengths: torch.Tensor = field(repr=False)  # [N]
    vocab_strata: dict[str, Any] = field(default_factory=dict)  # full-vocabulary parity by position / by mu

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.attn} bs{self.batch_size}"

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "attn": self.attn, "batch_size": self.batch_size,
                "metrics": self.metrics, "observed": self.observed, "vocab_strata": self.vocab_strata}


@dataclass
class ProbeResult:
    model: dict[str, Any]
    settings: dict[str, Any]
    configs: list[ConfigResult]
    fp16_range: dict[str, Any] | None
    runtime_s: float
    versions: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "configs": [c.to_json() for c in self.configs],
            "fp16_range": self.fp16_range,
            "runtime_s": self.runtime_s,
            "versions": self.versions,
        }


def seq_log_ratio_slope(log_ratio: torch.Tensor, lengths: torch.Tensor) -> float:
    """Least-squares slope of sum_t (lpi - lmu) against completion length, per 1000 tokens.

    The line goes through the origin: an empty completion's log-ratio is exactly 0, so the slope is
    the average drift per token (the paper's "BF16 -1.01 vs FP16 -0.07 per 1K tokens"), and it stays
    defined when every completion has the same length (all truncated at --max-new-tokens).
    """
    x, y = lengths.double(), log_ratio.double()
    denom = x.square().sum()
    if denom == 0:
        return float("nan")
    return ((x * y).sum() / denom).item() * 1000.0


def seq_log_ratio_slope_stderr(log_ratio: torch.Tensor, lengths: torch.Tensor) -> float:
    """Standard error of ``seq_log_ratio_slope`` (per 1000 tokens): with a few dozen completions the
    slope is noisy, and a user comparing dtypes should see by how much."""
    x, y = lengths.double(), log_ratio.double()
    denom = x.square().sum()
    if denom == 0 or x.numel() < 2:
        return float("nan")
    residual = y - (x * y).sum() / denom * x
    return (residual.square().sum() / (x.numel() - 1) / denom).sqrt().item() * 1000.0


def bitwise_equal_ratio(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of real tokens whose two logprobs are bitwise identical (batch-invariant kernels give 1)."""
    mask = mask.bool()
    if not mask.any():
        return float("nan")
    return (sampler_logprobs[mask] == trainer_logprobs[mask]).double().mean().item()


def probe_metrics(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The shared ``mismatch/*`` metrics plus the probe's own ``probe/*`` ones, for ``[N, C]`` inputs."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    log_ratio = ((trainer_logprobs - sampler_logprobs) * mask).sum(dim=1)
    finite = torch.isfinite(sampler_logprobs[mask]) & torch.isfinite(trainer_logprobs[mask])
    return {
        **mismatch_metrics(sampler_logprobs, trainer_logprobs, mask),
        "probe/seq_log_ratio_slope_per_1k": seq_log_ratio_slope(log_ratio, lengths),
        "probe/seq_log_ratio_slope_stderr_per_1k": seq_log_ratio_slope_stderr(log_ratio, lengths),
        "probe/bitwise_equal_ratio": bitwise_equal_ratio(sampler_logprobs, trainer_logprobs, mask),
        "probe/num_tokens": float(lengths.sum()),
        "probe/num_sequences": float(mask.shape[0]),
        "probe/nonfinite_tokens": float((~finite).sum()),
        "probe/length_mean": lengths.double().mean().item(),
    }



# --- the measurement ---------------------------------------------------------------------------

@dataclass
class Measurement:
    """Sampler and trainer logprobs of the same completions, ``[N, C]`` with a real-token mask."""

    sampler_logprobs: torch.Tensor
    trainer_logprobs: torch.Tensor
    mask: torch.Tensor
    observed: dict[str, Any]  # dtypes each engine actually computed in (DtypeRecorder)
    sampler_s: float
    trainer_s: float
    vocab: PositionStats | None = None  # the full-vocabulary parity's positions (``VOCAB_POSITIONS`` a chunk)


# Positions of each chunk whose whole distributions the probe compares (``measure/vocab.py``): more than a
# training step's default, so that its strata by position and by probability hold enough of them.
VOCAB_POSITIONS = 512


def measure_config(
    model_path: Path,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    dtype: str,
    attn: str,
    batch_size: int,
    settings: ProbeSettings,
    advance: Callable[[str], None] = lambda _: None,
) -> Measurement:
    """Sample ``num_samples`` completions with the sampler in ``dtype`` and recompute them with the
    trainer's model, exactly as a run with the same options does at its first step.

    The trainer's model is built as ``Trainer`` builds it (``load_trainer_model`` + ``MasterWeights``:
    LoRA or full fine-tuning, ``trainer_compute``), the sampler from it, and every chunk of
    ``batch_size`` samples goes through ``measure.rollouts.measure_rollouts``, the function the trainer's step
    calls. Sample ``j`` draws the noise of slot ``j`` in every configuration (paired draws).
    """
    policy = PrecisionPolicy.from_options(dtype, trainer_compute=settings.trainer_compute,
                                          fp32_modules=settings.fp32_modules)
    device = resolve_device(settings.device)
    lora = None if settings.lora_r == 0 else LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha,
                                                           use_rslora=settings.use_rslora,
                                                           target_modules=tuple(settings.lora_target_modules))
    model = load_trainer_model(model_path, policy.trainer_dtype, lora, attn, device,
                               fp32_modules=policy.fp32_modules).eval()
    MasterWeights(model, policy)
    head = LogitHead.of(model)
    pad_token_id = tokenizer.pad_token_id
    sampler = Sampler(model, policy.sampler_dtype, pad_token_id, stop_token_ids(model, tokenizer),
                      engine=settings.sampler_engine)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    observed: dict[str, Any] = {}
    timings = {"sampler": 0.0, "trainer": 0.0}
    positions: list[PositionStats] = []
    for start in range(0, settings.num_samples, batch_size):
        rows = range(start, min(start + batch_size, settings.num_samples))
        request = RolloutRequest([prompts[j % len(prompts)] for j in rows], 1, params, derived_seed(settings.seed),
                                 rows, vocab_positions=VOCAB_POSITIONS)
        forward = TrainerForward(model, head, policy, params.temperature, len(rows), 2048)
        measured = measure_rollouts(sampler, request, forward, pad_token_id)
        timings["sampler"] += measured.sample_s
        timings["trainer"] += measured.recompute_s
        if not observed:
            # The same guard as training: a dtype that did not take effect would make the numbers lie.
            observed = check_observed(policy, measured.observed["sampler"], measured.observed["trainer"],
                                      full_finetune=lora is None)["observed"]
        rollouts = measured.rollouts
        parts.append((rollouts.sampler_logprobs, measured.old_logprobs.cpu(), rollouts.completion_mask))
        positions.append(measured.vocab.positions())
        advance(f"{len(rows)} samples")
    width = max(part[0].shape[1] for part in parts)
    mu, pi, mask = (torch.cat([torch.nn.functional.pad(part[i], (0, width - part[i].shape[1])) for part in parts])
                    for i in range(3))
    return Measurement(mu, pi, mask.bool(), observed, timings["sampler"], timings["trainer"], concatenate(positions))


def run_probe(settings: ProbeSettings, show_progress: bool = False) -> ProbeResult:
    """Every configuration of ``settings`` plus the fp16 range check; nothing is written here."""
    settings.validate()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or auto_threads(resolve_device(settings.device)))
    try:
        return _run_probe(settings, show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_probe(settings: ProbeSettings, show_progress: bool) -> ProbeResult:
    started = time.perf_counter()
    model_path = model_folder(settings.model_path)
    texts = read_prompt_texts(settings.prompts) if settings.prompts else list(BUILTIN_PROMPTS)
    tokenizer = load_tokenizer(model_path)
    prompts = encode_prompts(texts, tokenizer, settings.chat_template)
    device = resolve_device(settings.device)

    # Progress ticks: one per model load, one for the range check, one per sampled chunk.
    chunks = sum(math.ceil(settings.num_samples / b) for b in settings.batch_sizes)
    total = 1 + len(settings.attn) * len(settings.dtypes) * chunks + int(settings.check_fp16_range)
    configs: list[ConfigResult] = []
    fp16_range: dict[str, Any] | None = None
    with Progress("probe", total, enabled=show_progress, unit="chunk") as progress:
        progress.update(description=f"loading {model_path.name}")
        reference = load_model(model_path, torch.float32, settings.attn[0], device).eval()
        model_info = _describe_model(reference, model_path)
        progress.update(advance=1)
        if settings.check_fp16_range:
            progress.update(description="fp16 range check (fp32 forward)")
            fp16_range = fp16_range_check(reference, prompts, settings.fp16_headroom)
            progress.update(advance=1)
        del reference
        settings = replace(settings, fp32_modules=settings.islands(fp16_range))  # 'flagged' -> the names it flagged
        for attn in settings.attn:
            for dtype in settings.dtypes:
                for batch_size in settings.batch_sizes:
                    label = f"{dtype} {attn} bs{batch_size}"
                    progress.update(description=label)
                    measurement = measure_config(
                        model_path, tokenizer, prompts, dtype, attn, batch_size, settings,
                        advance=lambda what, label=label: progress.update(advance=1, description=f"{label}: {what}"),
                    )
                    configs.append(_config_result(dtype, attn, batch_size, measurement))
    if fp16_range is not None:
        fp16_configs = [c for c in configs if c.dtype == "float16"]
        if fp16_configs:
            fp16_range["fp16_nonfinite_tokens"] = sum(c.metrics["probe/nonfinite_tokens"] for c in fp16_configs)
    settings_doc = {**asdict(settings), "num_prompts": len(prompts),
                    "prompts": "built-in" if settings.prompts is None else settings.prompts,
                    "device": str(device)}
    return ProbeResult(model_info, settings_doc, configs, fp16_range, time.perf_counter() - started,
                       library_versions())


def _config_result(dtype: str, attn: str, batch_size: int, m: Measurement) -> ConfigResult:
    mu, pi, mask = m.sampler_logprobs, m.trainer_logprobs, m.mask
    metrics = probe_metrics(mu, pi, mask)
    metrics["time/sampler_s"] = m.sampler_s
    metrics["time/trainer_s"] = m.trainer_s
    metrics["throughput/sampler_tokens_per_s"] = metrics["probe/num_tokens"] / max(m.sampler_s, 1e-9)
    metrics.update(vocab_metrics(m.vocab.kl, m.vocab.tv) if m.vocab is not None else {})
    return ConfigResult(
        dtype=dtype, attn=attn, batch_size=batch_size, metrics=metrics, observed=m.observed,
        sampler_logprobs=mu[mask], trainer_logprobs=pi[mask],
        seq_log_ratio=((pi - mu) * mask).sum(dim=1), seq_lengths=mask.sum(dim=1),
        vocab_strata=vocab_strata(m.vocab) if m.vocab is not None else {},
    )


def _describe_model(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    config = model.config
    return {
        "path": str(path),
        "name": path.name,
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "stored_dtype": str(getattr(config, "dtype", None) or "unknown").removeprefix("torch."),
        "master_weights": "float32",
    }

