"""``fp16rl probe --drill-down``: where in the network the sampler and the trainer part ways, per dtype.

The probe says *how large* the sampler/trainer mismatch is; this says *where it enters and how it grows*.
For each dtype it samples the probe's first ``drill_down_samples`` completions (the same slots and seed,
so the same completions as the probe's first chunks) and records, with forward hooks, the activations
of three paths at every completion position:

* sampler: the sampler's own incremental decode, replayed on its completions. The replay runs the
  sampler's decoding engine (``Sampler.make_decoder``: prefill, then one token per step with its KV
  cache, in the sampler dtype, with its kernels) and drops finished rows from the batch where the
  sampler dropped them, so every step has the batch shape it had when sampling. Hooked modules run as
  modules instead of the fast engine's lean functions, which are bitwise equal to them; the replay's
  logprobs are compared with the sampled mu (``replay_mu_max_abs_diff``, 0 when the replay is exact).
* trainer: the trainer's forward over prompt + completion (``TrainerForward``: its model, compute
  context and head), as pi_old is computed at step 1.
* reference: the same forward of the model in FP32 (weights and arithmetic).

Recorded per decoder layer ``i``: each norm's output (``layer.i.input_layernorm`` ...), the attention
output (``layer.i.attention``: ``self_attn.o_proj``'s output), the MLP's (``layer.i.mlp``) and the
residual stream after the layer (``layer.i.output``: the input of the next layer's first norm, or of
the final norm); and ``embedding``, ``final_norm`` and ``logits`` (the model's processed logits). For
each point, over all real completion tokens (Frobenius norms)::

    sampler_vs_trainer   = ||a_sampler - a_trainer|| / ||a_ref||
    sampler_vs_reference = ||a_sampler - a_ref||     / ||a_ref||
    trainer_vs_reference = ||a_trainer - a_ref||     / ||a_ref||
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from fp16rl.core.errors import ModelError
from fp16rl.core.seeds import derived_seed
from fp16rl.learner.logprobs import LogitHead
from fp16rl.learner.weights import MasterWeights
from fp16rl.measure.rollouts import TrainerForward
from fp16rl.model.forward import build_token_batch, causal_lm, left_pad
from fp16rl.model.loading import LoraSettings, load_model, load_trainer_model, stop_token_ids
from fp16rl.model.precision import PrecisionPolicy
from fp16rl.probe.settings import ProbeSettings
from fp16rl.rollout.sampler import Rollouts, Sampler, SamplingParams

PAIRS = ("sampler_vs_trainer", "sampler_vs_reference", "trainer_vs_reference")
Point = tuple[str, torch.nn.Module, str]  # (key, module, "output" | "input")
# The order a decoder layer runs its parts in (Llama, Qwen2, Mistral; Gemma2's extra norms); other norms follow.
FORWARD_ORDER = {name: rank for rank, name in enumerate(
    ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
     "post_feedforward_layernorm"))}


def drill_points(model: torch.nn.Module) -> list[Point]:
    """The recorded points of ``model`` in forward order (see the module docstring)."""
    lm = causal_lm(model)
    body = lm.get_decoder()
    layers, final_norm = getattr(body, "layers", None), getattr(body, "norm", None)
    if layers is None or final_norm is None or not all(
            hasattr(layer, "input_layernorm") and hasattr(getattr(layer, "self_attn", None), "o_proj")
            and hasattr(layer, "mlp") for layer in layers):
        raise ModelError(f"--drill-down needs decoder layers with input_layernorm, self_attn.o_proj and mlp, and a "
                         f"final norm (Llama, Qwen2, Mistral, Gemma2...); {type(lm).__name__} has other ones")
    points: list[Point] = [("embedding", body.embed_tokens, "output")]
    for i, layer in enumerate(layers):
        children = [(name, child) for name, child in layer.named_children() if name in FORWARD_ORDER or "norm" in name]
        for name, child in sorted(children, key=lambda item: FORWARD_ORDER.get(item[0], len(FORWARD_ORDER))):
            if name == "self_attn":
                points.append((f"layer.{i}.attention", child.o_proj, "output"))
            elif name == "mlp":
                points.append((f"layer.{i}.mlp", child, "output"))
            else:
                points.append((f"layer.{i}.{name}", child, "output"))
        after = layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm
        points.append((f"layer.{i}.output", after, "input"))
    points.append(("final_norm", final_norm, "output"))
    return points


@dataclass
class ActivationRecorder:
    """One path's activations at the completion positions: key -> ``[rows, columns, D]`` in the dtype the
    path computed. ``where``: during a decode call, (the batch's rows, the completion column); None for a
    full forward, whose positions ``prompt_width - 1 + t`` predict completion token t."""

    rows: int
    columns: int
    prompt_width: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    where: tuple[torch.Tensor, int] | None = None

    def store(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        tensor = tensor[:, None] if tensor.dim() == 2 else tensor  # [rows, D]: one position
        buffer = self.values.get(key)
        if buffer is None:
            buffer = self.values[key] = tensor.new_zeros(self.rows, self.columns, tensor.shape[-1])
        if self.where is not None:
            rows, column = self.where
            buffer[rows, column] = tensor[:, -1].to(buffer.dtype)
        else:
            start = self.prompt_width - 1
            part = tensor[:, start: start + self.columns]
            buffer[:, : part.shape[1]] = part.to(buffer.dtype)


def _output_hook(recorder: ActivationRecorder, key: str, _module: torch.nn.Module, _args: tuple, output: Any) -> None:
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(tensor, torch.Tensor):
        recorder.store(key, tensor)


def _input_hook(recorder: ActivationRecorder, key: str, _module: torch.nn.Module, args: tuple) -> None:
    if args and isinstance(args[0], torch.Tensor):
        recorder.store(key, args[0])


@contextlib.contextmanager
def recording(model: torch.nn.Module, recorder: ActivationRecorder) -> Iterator[ActivationRecorder]:
    """Hooks on ``model``'s points for the duration. Input points are prepended, so they see the residual
    stream before an FP32 island's upcast; output points see what flows on (an island's rounded output)."""
    handles = []
    for key, module, kind in drill_points(model):
        if kind == "input":
            handles.append(module.register_forward_pre_hook(partial(_input_hook, recorder, key), prepend=True))
        else:
            handles.append(module.register_forward_hook(partial(_output_hook, recorder, key)))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def replay_sampler(sampler: Sampler, rollouts: Rollouts, max_new_tokens: int) -> ActivationRecorder:
    """The sampler's decode of ``rollouts`` again, teacher-forced on its own tokens, with the batch shapes
    of ``Sampler._decode`` (a row leaves the batch after drawing EOS), recording every point and the
    logits each step returned. One prompt per row (``num_generations`` 1, as the probe samples)."""
    device = sampler.device
    input_ids, attention = (t.to(device) for t in left_pad(rollouts.prompt_ids, sampler.pad_token_id))
    tokens, mask = rollouts.completion_ids.to(device), rollouts.completion_mask.to(device)
    lengths = mask.sum(1)
    ends_in_eos = torch.tensor([r == "eos" for r in rollouts.finish_reasons], device=device)
    recorder = ActivationRecorder(len(tokens), tokens.shape[1], input_ids.shape[1])
    active = torch.arange(len(tokens), device=device)
    with recording(sampler.model, recorder):
        decoder = sampler.make_decoder(max_new_tokens)  # after the hooks: the fast engine then calls the modules
        recorder.where = (active, 0)
        logits = decoder.prefill(input_ids, attention)
        for step in range(tokens.shape[1]):
            recorder.where = (active, step)
            recorder.store("logits", logits)
            done = ends_in_eos[active] & (lengths[active] == step + 1)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                decoder.select(keep)
                active = active[keep]
            if step + 1 >= min(tokens.shape[1], max_new_tokens):
                break
            recorder.where = (active, step + 1)
            logits = decoder.step(tokens[active, step])
    return recorder


class _RecordingHead:
    """A ``LogitHead`` that keeps the logits it computes (the trainer applies it to the completion
    positions, flattened in mask order, in chunks)."""

    def __init__(self, head: LogitHead):
        self.head = head
        self.chunks: list[torch.Tensor] = []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        self.chunks.append(logits.detach())
        return logits


@torch.no_grad()
def forward_path(model: torch.nn.Module, policy: PrecisionPolicy, tokens: Any,
                 temperature: float) -> tuple[ActivationRecorder, torch.Tensor]:
    """The trainer's full forward (``TrainerForward``, one micro-batch) over ``tokens``: its recorded points
    and logits, and its token logprobs ``[N, C]``."""
    head = _RecordingHead(LogitHead.of(model))
    rows, columns = tokens.completion_ids.shape
    forward = TrainerForward(model, head, policy, temperature, rows, 1 << 30)  # type: ignore[arg-type]
    recorder = ActivationRecorder(rows, columns, tokens.prompt_width)
    with recording(model, recorder):
        logprobs, _ = forward.logprobs(tokens)
    logits = torch.cat(head.chunks)
    buffer = logits.new_zeros(rows, columns, logits.shape[-1])
    buffer[tokens.completion_mask] = logits
    recorder.values["logits"] = buffer
    return recorder, logprobs


@dataclass
class Sums:
    """Squared Frobenius norms summed over chunks: ``pairs`` of differences and the reference's."""

    pairs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PAIRS, 0.0))
    reference: float = 0.0

    def add(self, sampler: torch.Tensor, trainer: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> None:
        s, t, r = (x[mask].float() for x in (sampler, trainer, reference))
        for name, (a, b) in zip(PAIRS, ((s, t), (s, r), (t, r))):
            self.pairs[name] += (a - b).square().sum(dtype=torch.float64).item()
        self.reference += r.square().sum(dtype=torch.float64).item()

    def relative(self) -> dict[str, float]:
        """Each pair's ``||a - b|| / ||a_ref||``, and the two norms (``abs_sampler_vs_trainer``, ``reference_norm``)."""
        ref = math.sqrt(self.reference)
        out = {name: math.sqrt(value) / ref if ref > 0 else float("nan") for name, value in self.pairs.items()}
        out["abs_sampler_vs_trainer"] = math.sqrt(self.pairs["sampler_vs_trainer"])
        out["reference_norm"] = ref
        return out


@dataclass
class Engines:
    """One dtype's trainer model (as ``measure_config`` builds it) and the sampler made from it."""

    policy: PrecisionPolicy
    model: torch.nn.Module
    sampler: Sampler


def build_engines(model_path: Path, tokenizer: Any, dtype: str, settings: ProbeSettings, islands: Sequence[str],
                  device: torch.device) -> Engines:
    """The trainer's model and the sampler in ``dtype``, with the probe's options and ``islands``."""
    policy = PrecisionPolicy.from_options(dtype, trainer_compute=settings.trainer_compute, fp32_modules=islands)
    lora = None if settings.lora_r == 0 else LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha,
                                                           use_rslora=settings.use_rslora,
                                                           target_modules=tuple(settings.lora_target_modules))
    model = load_trainer_model(model_path, policy.trainer_dtype, lora, settings.attn[0], device,
                               fp32_modules=policy.fp32_modules).eval()
    MasterWeights(model, policy)
    sampler = Sampler(model, policy.sampler_dtype, tokenizer.pad_token_id, stop_token_ids(model, tokenizer),
                      engine=settings.sampler_engine)
    return Engines(policy, model, sampler)


@dataclass
class DtypeDrill:
    """One dtype's sums over the chunks, and its logprob differences."""

    sums: dict[str, Sums] = field(default_factory=dict)
    logprob_abs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PAIRS, 0.0))
    replay_max_abs: float = 0.0
    tokens: int = 0

    def add_chunk(self, paths: tuple[ActivationRecorder, ActivationRecorder, ActivationRecorder],
                  logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mask: torch.Tensor) -> None:
        """Add one chunk: the three paths' points and token logprobs (sampled mu, trainer pi, reference)."""
        sampler, trainer, reference = paths
        for key, ref_value in reference.values.items():
            self.sums.setdefault(key, Sums()).add(sampler.values[key], trainer.values[key], ref_value, mask)
        mu, pi, ref = (x[mask].double() for x in logprobs)
        for name, (a, b) in zip(PAIRS, ((mu, pi), (mu, ref), (pi, ref))):
            self.logprob_abs[name] += (a - b).abs().sum().item()
        self.tokens += int(mask.sum())

    def to_json(self, keys: Sequence[str]) -> dict[str, Any]:
        return {"num_tokens": self.tokens, "replay_mu_max_abs_diff": self.replay_max_abs,
                "logprob_abs_diff_mean": {k: v / max(self.tokens, 1) for k, v in self.logprob_abs.items()},
                "relative_error": {key: self.sums[key].relative() for key in keys if key in self.sums}}


def drill_dtype(engines: Engines, reference: torch.nn.Module, prompts: Sequence[Sequence[int]],
                settings: ProbeSettings, pad_token_id: int, advance: Callable[[str], None]) -> DtypeDrill:
    """The drill-down of one dtype over ``settings.drill_down_samples`` completions, in chunks of the
    probe's first batch size (the sampler's batch shape in the probe)."""
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p)
    reference_policy = PrecisionPolicy.from_options("float32")
    device = engines.sampler.device
    drill = DtypeDrill()
    batch = settings.batch_sizes[0]
    for start in range(0, settings.drill_down_samples, batch):
        rows = range(start, min(start + batch, settings.drill_down_samples))
        rollouts = engines.sampler.generate([prompts[j % len(prompts)] for j in rows], 1, params,
                                            seed=derived_seed(settings.seed), slots=rows)
        tokens = build_token_batch(rollouts.prompt_ids, 1, rollouts.completion_ids, rollouts.completion_mask,
                                   pad_token_id).to(device)
        sampled = replay_sampler(engines.sampler, rollouts, params.max_new_tokens)
        trained, pi = forward_path(engines.model, engines.policy, tokens, params.temperature)
        referenced, ref = forward_path(reference, reference_policy, tokens, params.temperature)
        mask = tokens.completion_mask
        mu = rollouts.sampler_logprobs.to(device)
        replayed = torch.log_softmax(sampled.values["logits"].float() / params.temperature, dim=-1)
        replayed = replayed.gather(-1, tokens.completion_ids[..., None]).squeeze(-1)
        drill.replay_max_abs = max(drill.replay_max_abs, (replayed - mu)[mask].abs().max().item())
        drill.add_chunk((sampled, trained, referenced), (mu, pi, ref), mask)
        advance(f"{len(rows)} samples")
    return drill


def run_drill_down(settings: ProbeSettings, model_path: Path, tokenizer: Any, prompts: Sequence[Sequence[int]],
                   islands: Sequence[str], device: torch.device,
                   advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The drill-down of every dtype of ``settings`` (first attention kind); a JSON-able document."""
    reference = load_model(model_path, torch.float32, settings.attn[0], device).eval()
    keys = [key for key, _, _ in drill_points(reference)] + ["logits"]
    dtypes: dict[str, Any] = {}
    for dtype in settings.dtypes:
        engines = build_engines(model_path, tokenizer, dtype, settings, islands, device)
        drill = drill_dtype(engines, reference, prompts, settings, tokenizer.pad_token_id,
                            lambda what, dtype=dtype: advance(f"drill-down {dtype}: {what}"))
        dtypes[dtype] = drill.to_json(keys)
        del engines
    return {"model": model_path.name, "num_layers": len(causal_lm(reference).get_decoder().layers),
            "keys": keys, "settings": {"samples": settings.drill_down_samples, "batch_size": settings.batch_sizes[0],
                                       "attn": settings.attn[0], "max_new_tokens": settings.max_new_tokens,
                                       "fp32_modules": list(islands), "sampler_engine": settings.sampler_engine,
                                       "trainer_compute": settings.trainer_compute, "lora_r": settings.lora_r},
            "dtypes": dtypes}


def drill_down_after(settings: ProbeSettings, fp16_range: dict[str, Any] | None, show_progress: bool = False
                     ) -> dict[str, Any]:
    """``run_drill_down`` for a probe's settings (after ``run_probe``: ``flagged`` islands are what its
    fp16 range check flagged), with its threads, prompts and a progress bar."""
    from fp16rl.model.hardware import auto_threads
    from fp16rl.model.loading import load_tokenizer, model_folder, resolve_device
    from fp16rl.probe.settings import BUILTIN_PROMPTS, encode_prompts, read_prompt_texts
    from fp16rl.runs.tracking import Progress

    settings.validate()
    model_path = model_folder(settings.model_path)
    tokenizer = load_tokenizer(model_path)
    texts = read_prompt_texts(settings.prompts) if settings.prompts else list(BUILTIN_PROMPTS)
    prompts = encode_prompts(texts, tokenizer, settings.chat_template)
    device = resolve_device(settings.device)
    chunks = len(settings.dtypes) * math.ceil(settings.drill_down_samples / settings.batch_sizes[0])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or auto_threads(device))
    try:
        with Progress("drill-down", chunks, enabled=show_progress, unit="chunk") as progress:
            return run_drill_down(settings, model_path, tokenizer, prompts, settings.islands(fp16_range), device,
                                  lambda what: progress.update(advance=1, description=what))
    finally:
        torch.set_num_threads(previous_threads)
