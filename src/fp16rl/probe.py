"""``fp16rl probe``: how large is the sampler/trainer mismatch of *this* model in bf16 vs fp16, without training.

For each (dtype, attention, batch size) configuration the real sampler (``Sampler``: its own copy of
the weights cast to the dtype, KV-cache decoding) draws completions and records their token
logprobs mu; the real trainer path (FP32 master weights, ``completion_logprobs`` under the dtype's
autocast, as ``Trainer`` computes pi_old) recomputes the same tokens. The difference is exactly what
a training run in that configuration sees at step 1, before any update makes it grow.

A second check answers "is fp16 safe for this model at all": an fp32 forward over the prompts with
hooks records the largest activation of every decoder layer's output (the residual stream) and of
every Linear, compared with the fp16 maximum 65504. Activations near it overflow to inf in fp16.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import fp16rl
from fp16rl.atomic import atomic_directory
from fp16rl.config import TRAINER_COMPUTE
from fp16rl.errors import ProbeError
from fp16rl.logprobs import build_token_batch, completion_logprobs
from fp16rl.mismatch import mismatch_metrics
from fp16rl.models import load_model, load_tokenizer, model_folder, resolve_device, stop_token_ids
from fp16rl.precision import DtypeRecorder, PrecisionPolicy, check_observed, dtype_name, parse_dtype
from fp16rl.sampler import Sampler, SamplingParams

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
ATTENTION_KINDS = ("sdpa", "eager")

# Short, varied chat prompts: different lengths (so batches are left-padded as in training) and
# different kinds of answer (facts, code, lists, prose), so the completions cover many token types.
BUILTIN_PROMPTS = (
    "Write a haiku about the sea.",
    "What is the capital of Australia? Answer in one sentence.",
    "Explain what a hash table is to a beginner.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for a good night's sleep.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "What is 17 times 23? Show your steps.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "List the colours of the rainbow.",
    "Write a short, friendly email declining a meeting invitation.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
)

# Column order of the terminal and markdown tables: (metric key, header, format).
TABLE_COLUMNS = (
    ("probe/num_tokens", "tokens", "{:.0f}"),
    ("mismatch/logp_abs_diff_mean", "|Δlogp|\nmean", "{:.2e}"),
    ("mismatch/logp_abs_diff_max", "|Δlogp|\nmax", "{:.2e}"),
    ("mismatch/prob_abs_diff_mean", "|Δp|\nmean", "{:.2e}"),
    ("mismatch/prob_abs_diff_max", "|Δp|\nmax", "{:.2e}"),
    ("mismatch/token_kl_k1", "token KL\nk1", "{:.1e}"),
    ("mismatch/token_kl_k3", "token KL\nk3", "{:.1e}"),
    ("mismatch/seq_kl", "seq KL\n[μ||π]", "{:.1e}"),
    ("probe/seq_log_ratio_slope_per_1k", "log-ratio slope\n/1k tokens", "{:+.2e}"),
    ("probe/bitwise_equal_ratio", "bitwise\nequal", "{:.1%}"),
    ("mismatch/pearson_prob", "pearson\nprob", "{:.6f}"),
)


@dataclass
class ProbeSettings:
    """What to measure. Defaults finish in a few minutes for a 135M model on 2 CPU cores."""

    model_path: str
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")  # float32 is the correctness baseline (~0)
    attn: tuple[str, ...] = ("sdpa",)  # attention kernels of both engines, as in training
    batch_sizes: tuple[int, ...] = (8,)  # sequences the sampler decodes together (batch-shape-dependent kernels)
    num_samples: int = 16  # completions per configuration; sample j uses prompt j mod #prompts
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0  # shapes the draw only; recorded logprobs are of the temperature-scaled distribution
    seed: int = 0  # sampling seeds are the same in every configuration (paired comparison)
    prompts_file: str | None = None  # one prompt per line, or JSONL with "prompt"; None = BUILTIN_PROMPTS
    chat_template: bool = True  # render prompts as a user message with the model's chat template
    check_fp16_range: bool = True
    fp16_headroom: float = 8.0  # warn when a layer's largest activation exceeds FP16_MAX / fp16_headroom
    sampler_engine: str = "auto"  # as `fp16rl train --sampler-engine`
    trainer_compute: str = "half_copy"  # as `fp16rl train --trainer-compute` (full fine-tuning semantics)
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = auto (cores not busy with other work, see auto_threads)

    def validate(self) -> None:
        """Normalise dtype names and reject impossible values before anything is loaded."""
        if not self.dtypes:
            raise ProbeError("--dtypes is empty")
        self.dtypes = tuple(dict.fromkeys(dtype_name(parse_dtype(d)) for d in self.dtypes))
        bad = [a for a in self.attn if a not in ATTENTION_KINDS]
        if bad or not self.attn:
            raise ProbeError(f"--attn {','.join(self.attn)}: use sdpa and/or eager")
        self.attn = tuple(dict.fromkeys(self.attn))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ProbeError("--batch-sizes must be positive integers")
        self.batch_sizes = tuple(dict.fromkeys(self.batch_sizes))
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ProbeError("--num-samples and --max-new-tokens must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ProbeError("--temperature must be > 0 and --top-p in (0, 1]")
        if self.fp16_headroom < 1:
            raise ProbeError("the fp16 headroom factor must be >= 1")
        if self.threads < 0:
            raise ProbeError("--threads must be >= 0 (0 = torch's default)")
        if self.trainer_compute not in TRAINER_COMPUTE:
            raise ProbeError(f"--trainer-compute must be one of {', '.join(TRAINER_COMPUTE)}")
        if self.sampler_engine not in ("auto", "fast", "hf"):
            raise ProbeError(f"--sampler-engine {self.sampler_engine!r}: use auto, fast or hf")


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

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.attn} bs{self.batch_size}"

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "attn": self.attn, "batch_size": self.batch_size,
                "metrics": self.metrics, "observed": self.observed}


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


# --- metrics -----------------------------------------------------------------------------------


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


# --- prompts -----------------------------------------------------------------------------------


def read_prompt_texts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSON Lines with a "prompt" string (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ProbeError(f"--prompts {path}: cannot read it ({reason})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ProbeError(f"--prompts {path}: the file holds no prompts")
    is_jsonl = path.suffix == ".jsonl" or numbered[0][1].lstrip().startswith("{")
    if not is_jsonl:
        return [line for _, line in numbered]
    texts = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ProbeError(f"--prompts {path}, line {number}: expected a JSON object with a non-empty \"prompt\" string")
        texts.append(record["prompt"])
    return texts


def encode_prompts(texts: Sequence[str], tokenizer: Any, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, as a user turn in the model's chat template when it has one."""
    ids = []
    for text in texts:
        if chat_template and tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


# --- fp16 range check ------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks: the longest ``ModuleList`` (``model.layers`` in Llama, Qwen2, Mistral...)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


@torch.no_grad()
def fp16_range_check(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], headroom: float = 8.0
) -> dict[str, Any]:
    """Largest |activation| per decoder layer output and per Linear output in an fp32 forward.

    A value above 65504 becomes inf in fp16 (then NaN logits); one within ``headroom`` of it is one
    unlucky prompt away. Each prompt runs alone (no padding), so only real tokens are measured.
    """
    layer_max: dict[str, float] = {}
    linear_max: dict[str, float] = {}

    def recorder(store: dict[str, float], name: str) -> Callable:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                store[name] = max(store.get(name, 0.0), tensor.detach().abs().amax().float().item())

        return hook

    handles = [m.register_forward_hook(recorder(layer_max, name)) for name, m in decoder_layers(model)]
    handles += [m.register_forward_hook(recorder(linear_max, name))
                for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    device = next(model.parameters()).device
    try:
        for ids in prompts:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    limit = FP16_MAX / headroom
    layers = [{"name": n, "max_abs": v, "headroom": _headroom(v)} for n, v in layer_max.items()]
    modules = sorted(({"name": n, "max_abs": v, "headroom": _headroom(v)} for n, v in linear_max.items()),
                     key=lambda m: -m["max_abs"])
    flagged_layers = [entry["name"] for entry in layers if entry["max_abs"] > limit]
    flagged_modules = [entry["name"] for entry in modules if entry["max_abs"] > limit]
    worst = max([*layers, *modules], key=lambda m: m["max_abs"], default={"name": None, "max_abs": 0.0})
    return {
        "fp16_max": FP16_MAX,
        "headroom_factor": headroom,
        "limit": limit,
        "ok": not flagged_layers and not flagged_modules,
        "max_abs": worst["max_abs"],
        "max_abs_at": worst["name"],
        "flagged_layers": flagged_layers,
        "flagged_modules": flagged_modules,
        "layers": layers,
        "top_modules": modules[:5],
        "num_prompt_tokens": sum(len(p) for p in prompts),
    }


def _headroom(max_abs: float) -> float:
    """How many times the largest activation fits under the fp16 maximum (inf for an all-zero output)."""
    return FP16_MAX / max_abs if max_abs > 0 else float("inf")


def fp16_range_summary(report: dict[str, Any]) -> str:
    """One line: the largest activation, where, and whether it leaves enough headroom below 65504."""
    ratio = _headroom(report["max_abs"])
    head = f"largest |activation| {report['max_abs']:.4g} at {report['max_abs_at']} ({ratio:.3g}x below fp16 max 65504)"
    nonfinite = report.get("fp16_nonfinite_tokens")
    measured = "" if nonfinite is None else (
        "; the float16 configurations here produced no inf/NaN" if nonfinite == 0
        else f"; the float16 configurations here produced {nonfinite:.0f} inf/NaN token logprobs")
    if report["ok"]:
        return f"fp16 range OK: {head}{measured}"
    layers = report["flagged_layers"]
    modules = [m for m in report["flagged_modules"] if not any(m.startswith(layer + ".") for layer in layers)]
    where = ", ".join(compact_names(layers) + modules)
    if report["max_abs"] > FP16_MAX:
        verdict = "OVERFLOWS in fp16"
    else:
        verdict = f"less than {report['headroom_factor']:g}x headroom"
    return f"fp16 range WARNING: {verdict} in {where}; {head}{measured}"


def compact_names(names: Sequence[str]) -> list[str]:
    """``model.layers.11``, ``model.layers.12``, ``model.layers.13`` -> ``model.layers.11-13``."""
    out: list[str] = []
    runs: list[tuple[str, int, int]] = []  # (prefix, first, last)
    for name in names:
        prefix, _, index = name.rpartition(".")
        if not index.isdigit():
            out.append(name)
            continue
        number = int(index)
        if runs and runs[-1][0] == prefix and runs[-1][2] == number - 1:
            runs[-1] = (prefix, runs[-1][1], number)
        else:
            runs.append((prefix, number, number))
    out += [f"{p}.{a}" if a == b else f"{p}.{a}-{b}" for p, a, b in runs]
    return out


# --- the measurement -------------------------------------------------------------------------


def chunk_seed(seed: int, start: int) -> int:
    """Sampling seed of the chunk starting at sample ``start``: equal in every dtype (paired draws)."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


@dataclass
class Measurement:
    """Sampler and trainer logprobs of the same completions, ``[N, C]`` with a real-token mask."""

    sampler_logprobs: torch.Tensor
    trainer_logprobs: torch.Tensor
    mask: torch.Tensor
    observed: dict[str, Any]  # dtypes each engine actually computed in (DtypeRecorder)
    sampler_s: float
    trainer_s: float


def measure_config(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    dtype: torch.dtype,
    batch_size: int,
    settings: ProbeSettings,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    advance: Callable[[str], None] = lambda _: None,
) -> Measurement:
    """Sample ``num_samples`` completions with the sampler in ``dtype``, recompute them as the trainer does.

    ``model`` holds the FP32 master weights (as in ``Trainer``); the sampler deep-copies and casts
    them, then decodes ``batch_size`` sequences per ``generate`` call; the trainer recomputes each
    call's rows together as a full fine-tuning run would: with ``half_copy`` on the masters cast to
    ``dtype`` (the very weights the sampler holds), with ``autocast`` on the FP32 masters under
    autocast(``dtype``).
    """
    policy = PrecisionPolicy.from_options(dtype_name(dtype), trainer_compute=settings.trainer_compute)
    device = next(model.parameters()).device
    sampler = Sampler(model, policy.sampler_dtype, pad_token_id, eos_token_ids, engine=settings.sampler_engine)
    trainer_model = model if policy.uses_autocast or dtype == torch.float32 else sampler.model
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    observed: dict[str, Any] = {}
    timings = {"sampler": 0.0, "trainer": 0.0}
    for start in range(0, settings.num_samples, batch_size):
        rows = range(start, min(start + batch_size, settings.num_samples))
        chunk_prompts = [prompts[j % len(prompts)] for j in rows]
        t0 = time.perf_counter()
        rollouts = sampler.generate(chunk_prompts, 1, params, seed=chunk_seed(settings.seed, start))
        t1 = time.perf_counter()
        batch = build_token_batch(rollouts.prompt_ids, 1, rollouts.completion_ids, rollouts.completion_mask,
                                  pad_token_id).to(device)
        recorder = DtypeRecorder()
        with torch.no_grad(), recorder.watch(trainer_model), policy.autocast(device.type):
            trainer_logprobs, _ = completion_logprobs(trainer_model, batch, settings.temperature)
        timings["sampler"] += t1 - t0
        timings["trainer"] += time.perf_counter() - t1
        if not observed:
            # The same guard as training: a dtype that did not take effect would make the numbers lie.
            observed = check_observed(policy, rollouts.observed_dtype, recorder.report())["observed"]
        parts.append((rollouts.sampler_logprobs, trainer_logprobs.cpu(), rollouts.completion_mask))
        advance(f"{len(rows)} samples")
    width = max(part[0].shape[1] for part in parts)
    mu, pi, mask = (torch.cat([torch.nn.functional.pad(part[i], (0, width - part[i].shape[1])) for part in parts])
                    for i in range(3))
    return Measurement(mu, pi, mask.bool(), observed, timings["sampler"], timings["trainer"])


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
    texts = read_prompt_texts(settings.prompts_file) if settings.prompts_file else list(BUILTIN_PROMPTS)
    tokenizer = load_tokenizer(model_path)
    prompts = encode_prompts(texts, tokenizer, settings.chat_template)
    device = resolve_device(settings.device)

    # Progress ticks: one per model load, one for the range check, one per sampled chunk.
    chunks = sum(math.ceil(settings.num_samples / b) for b in settings.batch_sizes)
    total = len(settings.attn) * (1 + len(settings.dtypes) * chunks) + int(settings.check_fp16_range)
    configs: list[ConfigResult] = []
    fp16_range: dict[str, Any] | None = None
    model_info: dict[str, Any] = {}
    with _Progress(total, show_progress) as progress:
        for attn in settings.attn:
            progress.describe(f"loading {model_path.name} ({attn})")
            model = load_model(model_path, torch.float32, attn, device).eval()
            eos_ids = stop_token_ids(model, tokenizer)
            progress.advance()
            if not model_info:
                model_info = _describe_model(model, model_path)
            if settings.check_fp16_range and fp16_range is None:
                progress.describe("fp16 range check (fp32 forward)")
                fp16_range = fp16_range_check(model, prompts, settings.fp16_headroom)
                progress.advance()
            for dtype in settings.dtypes:
                for batch_size in settings.batch_sizes:
                    label = f"{dtype} {attn} bs{batch_size}"
                    progress.describe(label)
                    measurement = measure_config(
                        model, prompts, parse_dtype(dtype), batch_size, settings, tokenizer.pad_token_id, eos_ids,
                        advance=lambda what, label=label: progress.advance(f"{label}: {what}"),
                    )
                    configs.append(_config_result(dtype, attn, batch_size, measurement))
            del model
    if fp16_range is not None:
        fp16_configs = [c for c in configs if c.dtype == "float16"]
        if fp16_configs:
            fp16_range["fp16_nonfinite_tokens"] = sum(c.metrics["probe/nonfinite_tokens"] for c in fp16_configs)
    settings_doc = {**asdict(settings), "num_prompts": len(prompts),
                    "prompts": "built-in" if settings.prompts_file is None else settings.prompts_file,
                    "device": str(device)}
    return ProbeResult(model_info, settings_doc, configs, fp16_range, time.perf_counter() - started, _versions())


def _config_result(dtype: str, attn: str, batch_size: int, m: Measurement) -> ConfigResult:
    mu, pi, mask = m.sampler_logprobs, m.trainer_logprobs, m.mask
    metrics = probe_metrics(mu, pi, mask)
    metrics["time/sampler_s"] = m.sampler_s
    metrics["time/trainer_s"] = m.trainer_s
    metrics["throughput/sampler_tokens_per_s"] = metrics["probe/num_tokens"] / max(m.sampler_s, 1e-9)
    return ConfigResult(
        dtype=dtype, attn=attn, batch_size=batch_size, metrics=metrics, observed=m.observed,
        sampler_logprobs=mu[mask], trainer_logprobs=pi[mask],
        seq_log_ratio=((pi - mu) * mask).sum(dim=1), seq_lengths=mask.sum(dim=1),
    )


def auto_threads(device: torch.device) -> int:
    """CPU threads for the probe: torch's default, less the cores other processes keep busy.

    Why: OpenMP threads wait for each other at every op; when another job holds one of the cores, a
    thread that cannot run stalls all the others. Measured on a 2-core machine with one core busy:
    SmolLM2-135M decoding took 46 s with 2 threads and 5 s with 1.
    """
    default = torch.get_num_threads()
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return default
    idle = (os.cpu_count() or default) - round(os.getloadavg()[0])
    return max(1, min(default, idle))


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


def _versions() -> dict[str, str]:
    import transformers

    return {
        "fp16rl": fp16rl.__version__,
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }



class _Progress:
    """A rich progress bar on stderr (or nothing): one tick per sampled chunk."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]probe"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=Console(stderr=True))
            self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, text: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, **({"description": text} if text else {}))


# --- outputs ---------------------------------------------------------------------------------


def default_output_dir(model_name: str, root: Path = Path("runs")) -> Path:
    """``runs/probe-<model>-<time>``: a fresh folder per call, so the default never collides."""
    base = root / f"probe-{model_name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def check_output_dir(path: Path) -> None:
    """Refuse a folder that holds anything (as `fp16rl train` does): earlier results are never overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ProbeError(f"--output-dir {path} is in use (not empty); choose another folder")


def write_outputs(result: ProbeResult, output_dir: Path) -> dict[str, Path]:
    """probe.json, probe.md and the figures, written into ``output_dir`` atomically."""
    check_output_dir(output_dir)
    names = {"json": "probe.json", "markdown": "probe.md", "token_probs": "token_probs.png",
             "seq_log_ratio": "seq_log_ratio.png"}
    with atomic_directory(output_dir) as tmp:
        (tmp / names["json"]).write_text(json.dumps(_jsonable(result.to_json()), indent=2) + "\n")
        (tmp / names["markdown"]).write_text(markdown_report(result, names))
        plot_token_probs(result, tmp / names["token_probs"])
        plot_seq_log_ratio(result, tmp / names["seq_log_ratio"])
    return {key: output_dir / name for key, name in names.items()}


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: written as strings so probe.json parses everywhere."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _cell(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if math.isfinite(value) else str(value)


def table_rows(result: ProbeResult) -> list[list[str]]:
    """dtype, attn, batch size, then TABLE_COLUMNS, formatted; shared by the terminal and markdown tables."""
    return [[c.dtype, c.attn, str(c.batch_size), *(_cell(c.metrics.get(k), f) for k, _, f in TABLE_COLUMNS)]
            for c in result.configs]


def table_headers() -> list[str]:
    """Column headers of the markdown table (one row per configuration); "|" escaped for GFM tables."""
    return ["dtype", "attn", "batch", *(header.replace("\n", " ").replace("|", "\\|") for _, header, _ in TABLE_COLUMNS)]


def render_tables(result: ProbeResult, width: int = 80) -> list[Any]:
    """Rich Tables with one row per metric and one column per configuration.

    Metrics down the side keep a column narrow (~12 characters), so a few configurations fit an
    80-column terminal; more are split over several tables rather than truncated.
    """
    from rich.table import Table

    per_table = max(1, (width - 32) // 12)
    tables = []
    for start in range(0, len(result.configs), per_table):
        configs = result.configs[start : start + per_table]
        table = Table(title=f"{result.model.get('name')}: Δ = trainer - sampler logprob, same tokens",
                      title_style="bold")
        table.add_column("metric", no_wrap=True)
        for config in configs:
            table.add_column(f"{config.dtype}\n{config.attn} bs{config.batch_size}", justify="right", no_wrap=True)
        for key, header, fmt in TABLE_COLUMNS:
            table.add_row(header.replace("\n", " "), *(_cell(c.metrics.get(key), fmt) for c in configs))
        tables.append(table)
    return tables


def comparison_lines(result: ProbeResult) -> list[str]:
    """Plain-language ratios: bf16 vs fp16 mean |Δlogp| and seq KL for each (attn, batch size)."""
    lines = []
    by_key = {(c.dtype, c.attn, c.batch_size): c.metrics for c in result.configs}
    for (dtype, attn, batch), metrics in by_key.items():
        other = by_key.get(("float16", attn, batch))
        if dtype != "bfloat16" or other is None:
            continue
        a, b = metrics["mismatch/logp_abs_diff_mean"], other["mismatch/logp_abs_diff_mean"]
        ratio = f"{a / b:.1f}x" if b > 0 else "infinitely"
        lines.append(f"{attn}, batch {batch}: bf16 mean |Δlogp| {a:.2e} is {ratio} fp16's {b:.2e}; "
                     f"seq KL {metrics['mismatch/seq_kl']:.1e} vs {other['mismatch/seq_kl']:.1e}")
    return lines


def markdown_report(result: ProbeResult, files: dict[str, str]) -> str:
    """probe.md: the table, the plain-language comparison, the fp16 range check and the figures."""
    s = result.settings
    headers = table_headers()
    out = [
        f"# fp16rl probe: {result.model.get('name')}",
        "",
        f"Model `{result.model.get('path')}` ({result.model.get('architecture')}, "
        f"{result.model.get('num_parameters', 0) / 1e6:.1f}M parameters, FP32 master weights). "
        f"{s['num_samples']} completions per configuration from {s['num_prompts']} prompts ({s['prompts']}), "
        f"up to {s['max_new_tokens']} new tokens, temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}, "
        f"device {s['device']}; runtime {result.runtime_s:.0f} s.",
        "",
        "Sampler: `Sampler` with its weights cast to the dtype (KV-cache decoding). Trainer: one full forward "
        "(`completion_logprobs`) of the FP32 master weights under autocast to the dtype. Same tokens; "
        "Δ = trainer - sampler logprob. float32 is the correctness baseline (should be ~0).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(result)),
        "",
    ]
    comparisons = comparison_lines(result)
    if comparisons:
        out += [*(f"- {line}" for line in comparisons), ""]
    if result.fp16_range is not None:
        report = result.fp16_range
        out += ["## fp16 range", "", fp16_range_summary(report), "",
                f"Largest |activation| per decoder layer output in an fp32 forward over the prompts "
                f"(flagged above 65504 / {report['headroom_factor']:g} = {report['limit']:.0f}):", "",
                "| layer | max abs | headroom |", "|---|---|---|"]
        out += [f"| {e['name']} | {e['max_abs']:.4g} | {e['headroom']:.3g}x |" for e in report["layers"]]
        out += ["", "Largest Linear outputs: " + ", ".join(f"{m['name']} {m['max_abs']:.4g}" for m in report["top_modules"]),
                ""]
    out += ["## Figures", "", f"![token probabilities]({files['token_probs']})", "",
            f"![sequence log-ratio vs length]({files['seq_log_ratio']})", ""]
    return "\n".join(out)


def _figure(ncols: int, nrows: int = 1, panel: float = 4.2) -> tuple[Any, Any]:
    """A figure drawn with the Agg canvas directly: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel * ncols + 0.6, panel * nrows * 0.95 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _by_dtype(result: ProbeResult) -> dict[str, list[ConfigResult]]:
    groups: dict[str, list[ConfigResult]] = {}
    for config in result.configs:
        groups.setdefault(config.dtype, []).append(config)
    return groups


def _solid_legend(ax: Any, **kwargs: Any) -> None:
    """A legend whose markers are opaque, though the points they stand for are translucent."""
    legend = ax.legend(**kwargs)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)


def plot_token_probs(result: ProbeResult, path: Path) -> None:
    """Trainer vs sampler probability of every sampled token, one column per dtype.

    Top row: π against μ (the paper's scatter). At |Δp| ~ 1e-3 every dtype looks like a perfect
    diagonal there, so the bottom row plots the difference π - μ against μ on one y scale shared by
    all dtypes: the width of that band is the mismatch.
    """
    groups = _by_dtype(result)
    fig, axes = _figure(max(len(groups), 1), nrows=2)
    spread = max((c.trainer_logprobs.exp() - c.sampler_logprobs.exp()).abs().max().item()
                 for c in result.configs if c.sampler_logprobs.numel()) if result.configs else 0.0
    spread = 1.15 * spread if spread > 0 else 1e-6
    for column, (dtype, configs) in enumerate(groups.items()):
        top, bottom = axes[0][column], axes[1][column]
        for config in configs:
            p_mu, p_pi = config.sampler_logprobs.exp().numpy(), config.trainer_logprobs.exp().numpy()
            m = config.metrics
            label = (f"{config.attn} bs{config.batch_size}: mean |Δp| {m['mismatch/prob_abs_diff_mean']:.1e}, "
                     f"max {m['mismatch/prob_abs_diff_max']:.1e}")
            top.scatter(p_mu, p_pi, s=4, alpha=0.35, linewidths=0)
            bottom.scatter(p_mu, p_pi - p_mu, s=4, alpha=0.35, linewidths=0, label=label)
        top.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        bottom.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        if len(configs) == 1:
            m = configs[0].metrics
            top.set_title(f"{dtype}\nmean |Δp| {m['mismatch/prob_abs_diff_mean']:.1e}, "
                          f"max |Δp| {m['mismatch/prob_abs_diff_max']:.1e}, "
                          f"pearson {m['mismatch/pearson_prob']:.5f}", fontsize=9)
        else:
            top.set_title(dtype, fontsize=10)
            _solid_legend(bottom, fontsize=6.5, loc="lower right", markerscale=3)
        top.set_xlim(-0.02, 1.02)
        top.set_ylim(-0.02, 1.02)
        top.set_aspect("equal")
        bottom.set_xlim(-0.02, 1.02)
        bottom.set_ylim(-spread, spread)
        bottom.set_xlabel("sampler probability μ(y_t)")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0][0].set_ylabel("trainer probability π(y_t)")
    axes[1][0].set_ylabel("π(y_t) - μ(y_t)  (same scale in every panel)")
    fig.suptitle(f"{result.model.get('name')}: probability of each sampled token, trainer vs sampler", fontsize=11)
    fig.savefig(path, dpi=110)


def plot_seq_log_ratio(result: ProbeResult, path: Path) -> None:
    """Per completion, log π(y)/μ(y) = Σ_t Δlogp against its length, with the fitted slope; one panel per dtype.

    Panels share the y axis so the dtypes compare at a glance (bf16's spread vs fp16's).
    """
    groups = _by_dtype(result)
    fig, grid = _figure(max(len(groups), 1), panel=4.0)
    axes = grid[0]
    limit = max((c.seq_log_ratio.abs().max().item() for c in result.configs if c.seq_log_ratio.numel()), default=1.0)
    limit = 1.1 * limit if limit > 0 else 1.0
    longest = max((int(c.seq_lengths.max()) for c in result.configs if c.seq_lengths.numel()), default=1)
    for ax, (dtype, configs) in zip(axes, groups.items()):
        for config in configs:
            slope = config.metrics["probe/seq_log_ratio_slope_per_1k"]
            stderr = config.metrics["probe/seq_log_ratio_slope_stderr_per_1k"]
            name = f"{config.attn} bs{config.batch_size}: " if len(configs) > 1 else ""
            points = ax.scatter(config.seq_lengths.numpy(), config.seq_log_ratio.numpy(), s=14, alpha=0.7,
                                label=f"{name}slope {slope:+.3g} ± {stderr:.2g} per 1k tokens")
            if math.isfinite(slope):
                ax.plot([0, longest], [0, slope * longest / 1000], color=points.get_facecolor()[0][:3], linewidth=1.2)
        ax.axhline(0, color="grey", linewidth=0.6)
        single = len(configs) == 1  # several configurations: their seq KL is in the table, not the title
        ax.set_title(f"{dtype}: seq KL[μ||π] {configs[0].metrics['mismatch/seq_kl']:.2e}" if single else dtype,
                     fontsize=10)
        ax.set_xlabel("completion length (tokens)")
        ax.set_xlim(0, longest * 1.05)
        ax.set_ylim(-limit, limit)
        _solid_legend(ax, fontsize=7, loc="best", title="points: completions; line: least-squares fit",
                      title_fontsize=7)
    axes[0].set_ylabel("log π(y)/μ(y) = Σ_t (log π - log μ)")
    fig.suptitle(f"{result.model.get('name')}: sequence log-ratio vs length", fontsize=11)
    fig.savefig(path, dpi=110)
