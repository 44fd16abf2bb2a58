"""The inference engine: batched KV-cache decoding in the sampler dtype, returning token logprobs (mu).

Like vLLM, the sampler holds its own copy of the weights in its dtype and computes in it; the
trainer pushes new weights after every optimizer step (``sync_from``). The recorded logprob of
a token is taken from the *unprocessed* temperature-scaled distribution, formed in fp32, which
is exactly what the trainer evaluates; top-p/top-k/repetition penalty only shape the draw.

Speed over ``model.generate()`` comes from prefilling each prompt once and fanning its KV cache
out to the ``n`` samples, from dropping finished rows out of the batch, and from a lean loop. Two
decoding engines share that loop: ``hf_decoder.HFCacheDecoder`` (any HF causal LM, DynamicCache) and,
for Llama/Qwen2/Mistral, ``fast_decode.LlamaFamilyDecoder`` (preallocated cache, no per-step HF
overhead; bitwise equal to the HF path in tests). Opt-in ``share_prompt_kv`` makes the fast engine
keep each prompt's K/V once for its ``n`` rows instead of copying it into each (memory at long
prompts; its own attention formula, so not bitwise equal to the HF path).

Each step's token is drawn by ``draw`` (processing, exponential race) with ``noise.TokenNoise``'s
numbers, which make a completion a function of ``(seed, slot, g)``, the prompt and the weights alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fp16rl.model.forward import causal_lm, left_pad
from fp16rl.model.loading import set_4bit_compute_dtype
from fp16rl.model.islands import cast_outside_islands
from fp16rl.model.precision import DtypeRecorder
from fp16rl.rollout.draw import SamplingParams, draw_tokens, process_logits, prompt_tokens_seen
from fp16rl.rollout.fast_decode import LlamaFamilyDecoder, unsupported_reason
from fp16rl.rollout.hf_decoder import HFCacheDecoder
from fp16rl.rollout.noise import TokenNoise, row_keys
from fp16rl.rollout.vocab_rows import VocabKeeper, VocabRows


@dataclass
class Rollouts:
    """Completions of one ``generate`` call, grouped by prompt: rows ``i*n .. i*n+n-1`` share prompt ``i``."""

    prompt_ids: list[list[int]]  # one per prompt (unpadded)
    completion_ids: torch.Tensor  # [N, C] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N, C] bool, True on real completion tokens (EOS included)
    sampler_logprobs: torch.Tensor  # [N, C] fp32, mu_t; 0 where masked
    finish_reasons: list[str]  # "eos" | "length"
    num_generations: int
    observed_dtype: dict[str, str] = field(default_factory=dict)
    # The distribution actually sampled, after repetition penalty, top-k and top-p (equal to mu without
    # them): its logprob of each token, and the unprocessed mass the processing kept. [N, C]; 0 / 1 masked.
    behaviour_logprobs: torch.Tensor | None = None
    kept_mass: torch.Tensor | None = None
    # The whole log-distributions at a bounded sample of positions (``vocab_rows``); None when not asked for.
    vocab: VocabRows | None = None

    @classmethod
    def concatenate(cls, parts: list["Rollouts"], pad_token_id: int) -> "Rollouts":
        """One ``Rollouts`` from several ``generate`` calls' (completions padded to the widest)."""
        width = max(p.completion_ids.shape[1] for p in parts)

        def padded(name: str, value: float | bool | int) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(getattr(p, name), (0, width - getattr(p, name).shape[1]),
                                                      value=value) for p in parts])

        observed = {k: "+".join(sorted({p.observed_dtype[k] for p in parts} - {"unobserved"})) or "unobserved"
                    for k in parts[0].observed_dtype}
        return cls(prompt_ids=[q for p in parts for q in p.prompt_ids], completion_ids=padded("completion_ids", pad_token_id),
                   completion_mask=padded("completion_mask", False), sampler_logprobs=padded("sampler_logprobs", 0.0),
                   finish_reasons=[r for p in parts for r in p.finish_reasons], num_generations=parts[0].num_generations,
                   observed_dtype=observed, behaviour_logprobs=padded("behaviour_logprobs", 0.0),
                   kept_mass=padded("kept_mass", 1.0), vocab=cls._merged_vocab(parts))

    @staticmethod
    def _merged_vocab(parts: list["Rollouts"]) -> VocabRows | None:
        """The calls' kept positions as one sample of the same size (``VocabRows.merge``)."""
        if parts[0].vocab is None:
            return None
        offsets = [0]
        for part in parts[:-1]:
            offsets.append(offsets[-1] + part.completion_ids.shape[0])
        return VocabRows.merge([p.vocab for p in parts], offsets)

    @property
    def truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reasons]

    def completion_lists(self) -> list[list[int]]:
        return [row[mask].tolist() for row, mask in zip(self.completion_ids, self.completion_mask)]


@dataclass
class CompletionBuffers:
    """What one decode call writes: ``[rows, max_new]`` buffers, column ``t`` filled at step ``t``.

    ``behaviour`` and ``kept_mass`` are written only where processing (penalty, top-k, top-p) is active,
    which sets ``processing``; without it the distribution drawn from is mu itself, so ``rollouts``
    takes ``logprobs`` for the behaviour logprobs (no copy per step)."""

    tokens: torch.Tensor  # long, pad_token_id where nothing was drawn
    logprobs: torch.Tensor  # fp32 mu: log_softmax(logits / T) at the drawn token
    behaviour: torch.Tensor  # fp32 log_softmax(processed logits) at the drawn token
    kept_mass: torch.Tensor  # fp32 sum of mu's probabilities over the tokens the processing kept
    lengths: torch.Tensor  # [rows] tokens in each completion (EOS included); max_new until one is drawn
    finished_eos: torch.Tensor  # [rows] bool
    processing: bool = False
    keeper: VocabKeeper | None = None  # keeps a sample of positions' whole rows (full-vocabulary parity)

    @classmethod
    def empty(cls, rows: int, max_new: int, pad_token_id: int, device: torch.device) -> "CompletionBuffers":
        """Buffers before the first step: no token drawn, every row running to ``max_new``."""
        return cls(tokens=torch.full((rows, max_new), pad_token_id, dtype=torch.long, device=device),
                   logprobs=torch.zeros(rows, max_new, dtype=torch.float32, device=device),
                   behaviour=torch.zeros(rows, max_new, dtype=torch.float32, device=device),
                   kept_mass=torch.ones(rows, max_new, dtype=torch.float32, device=device),
                   lengths=torch.full((rows,), max_new, dtype=torch.long, device=device),
                   finished_eos=torch.zeros(rows, dtype=torch.bool, device=device))

    def record(self, step: int, rows: torch.Tensor | None, drawn: torch.Tensor, scaled: torch.Tensor,
               processed: torch.Tensor) -> None:
        """Write step ``step``: the ``drawn`` tokens of output rows ``rows`` (None: every row, in order),
        their logprobs under ``scaled`` (the temperature-scaled logits) and under ``processed``."""
        unprocessed_logp = torch.log_softmax(scaled, dim=-1)
        columns = [(self.tokens, drawn), (self.logprobs, unprocessed_logp.gather(1, drawn[:, None]).squeeze(1))]
        if self.keeper is not None:
            self.keeper.offer(step, rows, unprocessed_logp)
        if processed is not scaled:  # else the distribution sampled is mu itself (no copy per step)
            self.processing = True
            columns.append((self.behaviour, torch.log_softmax(processed, dim=-1).gather(1, drawn[:, None]).squeeze(1)))
            columns.append((self.kept_mass, unprocessed_logp.exp().masked_fill(processed == float("-inf"), 0.0).sum(-1)))
        for output, values in columns:
            if rows is None:
                output[:, step] = values
            else:
                output[rows, step] = values

    def finish(self, rows: torch.Tensor, step: int) -> None:
        """Output rows ``rows`` drew an EOS token at step ``step``: their completions end with it."""
        self.finished_eos[rows] = True
        self.lengths[rows] = step + 1

    def rollouts(self, prompt_ids: Sequence[Sequence[int]], num_generations: int, pad_token_id: int,
                 observed_dtype: dict[str, str]) -> Rollouts:
        """The call's ``Rollouts`` on the CPU: columns up to the longest completion, masked past each end."""
        width = int(self.lengths.max())
        mask = torch.arange(width, device=self.lengths.device)[None, :] < self.lengths[:, None]
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=self.tokens[:, :width].masked_fill(~mask, pad_token_id).cpu(),
            completion_mask=mask.cpu(),
            sampler_logprobs=self.logprobs[:, :width].masked_fill(~mask, 0.0).cpu(),
            finish_reasons=["eos" if f else "length" for f in self.finished_eos.tolist()],
            num_generations=num_generations,
            observed_dtype=observed_dtype,
            behaviour_logprobs=(self.behaviour if self.processing else self.logprobs)[:, :width]
            .masked_fill(~mask, 0.0).cpu(),
            kept_mass=self.kept_mass[:, :width].masked_fill(~mask, 1.0).cpu(),
            # on the CPU like the other fields: a step's decode calls then hold one call's rows on the device
            vocab=self.keeper.result().to(torch.device("cpu")) if self.keeper is not None else None,
        )


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters (not buffers) to ``dtype``: RoPE frequencies stay fp32, as in vLLM; so do
    the FP32 islands the trainer's model holds (``fp16rl.model.islands``)."""
    cast_outside_islands(module, dtype)


class Sampler:
    """Generates completions with its own weights held in ``dtype``."""

    def __init__(
        self,
        model: torch.nn.Module,
        dtype: torch.dtype,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        engine: str = "auto",
        share_prompt_kv: bool = False,
    ):
        """Build the sampler's copy of ``model`` (the trainer's); frozen weights already in ``dtype`` are shared.

        ``engine``: "fast" = ``LlamaFamilyDecoder`` (Llama/Qwen2/Mistral, error if the model is not
        one it reproduces), "hf" = ``HFCacheDecoder`` (any causal LM), "auto" = fast where supported.
        ``share_prompt_kv``: the fast engine keeps each prompt's K/V once for its rows instead of a copy
        per row (``fast_decode.SharedPromptKV``: less memory, not bitwise equal to the default path);
        an error where the engine is (or resolves to) "hf", which has no such mode.
        """
        # Frozen weights already in ``dtype`` and quantised (integer) storage are shared, not copied.
        shared = {id(p): p for p in model.parameters()
                  if not p.requires_grad and (p.dtype == dtype or not p.is_floating_point())}
        self.model = copy.deepcopy(model, memo=shared)
        cast_parameters(self.model, dtype)
        set_4bit_compute_dtype(self.model, dtype)
        self.model.requires_grad_(False).eval()
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        # long even when empty (no EOS stop): isin needs integer test elements.
        self.eos_token_ids = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self._sync_names = [name for name, p in model.named_parameters() if p.requires_grad]
        if engine not in ("auto", "hf", "fast"):
            raise ValueError(f"unknown sampler engine {engine!r}; use auto, hf or fast")
        reason = unsupported_reason(self.model)
        if engine == "fast" and reason is not None:
            raise ValueError(f"sampler engine 'fast' cannot run this model: {reason}")
        self.engine = "hf" if engine == "hf" or reason is not None else "fast"
        if share_prompt_kv and self.engine == "hf":
            why = "engine 'hf' was asked for" if engine == "hf" else f"the fast engine cannot run this model: {reason}"
            raise ValueError(f"share_prompt_kv needs the fast sampler engine (Llama/Qwen2/Mistral), but {why}")
        self.share_prompt_kv = share_prompt_kv

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one row holds per position: ``2 (K, V) x layers x kv_heads x head_dim x
        element size`` (8B Llama in fp16: 2 x 32 x 8 x 128 x 2 B = 131 kB)."""
        config = causal_lm(self.model).config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return 2 * config.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize

    def rows_within(self, kv_budget_bytes: float, prompt_tokens: int, new_tokens: int, num_generations: int) -> int:
        """The most rows whose KV cache fits ``kv_budget_bytes``, in whole prompt groups and at least one
        group (a group's rows are decoded together). A group of G rows holds ``G x (prompt + new)``
        positions, or with ``share_prompt_kv`` ``prompt + G x new`` (one copy of the prompt)."""
        if self.share_prompt_kv:
            group_tokens = prompt_tokens + num_generations * new_tokens
        else:
            group_tokens = num_generations * (prompt_tokens + new_tokens)
        groups = int(kv_budget_bytes // (self.kv_bytes_per_token() * group_tokens))
        return max(1, groups) * num_generations

    def rows_per_call(self, generation_batch_size: int | None, gpu_memory_utilization: float,
                      prompt_ids: Sequence[Sequence[int]], new_tokens: int, num_generations: int) -> int | None:
        """Rows decoded at once: ``generation_batch_size`` when given, else on CUDA as many as keep the KV
        cache within ``gpu_memory_utilization`` of the GPU (vLLM's meaning of the seed's option: the
        engine's share of the card; the weights are the trainer's, shared). None: all at once."""
        if generation_batch_size is not None or self.device.type != "cuda":
            return generation_batch_size
        budget = gpu_memory_utilization * torch.cuda.get_device_properties(self.device).total_memory
        return self.rows_within(budget, max(len(p) for p in prompt_ids), new_tokens, num_generations)

    @torch.no_grad()
    def sync_from(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the trainer's trainable weights (LoRA: adapters only), given as FP32 masters, cast to our dtype."""
        target = dict(self.model.named_parameters())
        for name in self._sync_names:
            target[name].copy_(weights[name])

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_generations: int,
        params: SamplingParams,
        seed: int,
        slots: Sequence[int] | None = None,
        should_stop: Callable[[], None] | None = None,
        max_rows: int | None = None,
        vocab_positions: int = 0,
    ) -> Rollouts:
        """Sample ``num_generations`` completions for each prompt.

        Completion ``g`` of the prompt in slot ``slots[i]`` (default ``i``) is a pure function of
        ``(seed, slot, g)``, the prompt and the weights: its random numbers do not depend on which
        other rows exist, when they finish, the batch size or the engine (see ``noise.TokenNoise``).
        ``max_rows`` bounds the rows decoded at once (the KV cache), in whole prompt groups.
        ``should_stop`` is called once per decoded token and may raise to abandon the call.
        ``vocab_positions``: keep the whole log-distribution at that many completion positions
        (``Rollouts.vocab``; ``vocab_rows`` says which), 0 none.
        """
        slots = list(range(len(prompt_ids))) if slots is None else list(slots)
        if len(slots) != len(prompt_ids) or len(set(slots)) != len(slots):
            raise ValueError(f"need one distinct slot per prompt, got {len(slots)} slots for {len(prompt_ids)} prompts")
        per_call = len(prompt_ids) if max_rows is None else max(1, max_rows // num_generations)
        with torch.inference_mode():
            parts = [self._generate(prompt_ids[i:i + per_call], num_generations, params,
                                    row_keys(seed, slots[i:i + per_call], num_generations), should_stop,
                                    vocab_positions)
                     for i in range(0, len(prompt_ids), per_call)]
            rollouts = parts[0] if len(parts) == 1 else Rollouts.concatenate(parts, self.pad_token_id)
        # Inference-mode tensors cannot enter autograd later (the trainer indexes with the mask).
        for name in ("completion_ids", "completion_mask", "sampler_logprobs", "behaviour_logprobs", "kept_mass"):
            setattr(rollouts, name, getattr(rollouts, name).clone())
        rollouts.vocab = rollouts.vocab.clone() if rollouts.vocab is not None else None
        return rollouts

    def _generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_generations: int,
        params: SamplingParams,
        keys: torch.Tensor,
        should_stop: Callable[[], None] | None,
        vocab_positions: int = 0,
    ) -> Rollouts:
        """One decode call (``generate`` splits the prompts into calls of at most ``max_rows`` rows, at
        least one prompt group): prefill each prompt once, fan its state out to ``num_generations`` rows,
        decode them."""
        device = self.device
        recorder = DtypeRecorder()
        input_ids, attention = (t.to(device) for t in left_pad(prompt_ids, self.pad_token_id))
        decoder = self.make_decoder(params.max_new_tokens)
        with recorder.watch(self.model):
            logits = decoder.prefill(input_ids, attention)
        decoder.repeat_interleave(num_generations)
        logits = logits.repeat_interleave(num_generations, dim=0)
        vocab = logits.shape[-1]
        seen = (prompt_tokens_seen(input_ids, attention, num_generations, vocab)
                if params.repetition_penalty != 1.0 else None)
        out = CompletionBuffers.empty(len(logits), params.max_new_tokens, self.pad_token_id, device)
        if vocab_positions > 0:
            out.keeper = VocabKeeper(keys, vocab_positions, vocab, device)
        self._decode(decoder, logits, TokenNoise(keys.to(device), vocab), seen, params, out, should_stop)
        return out.rollouts(prompt_ids, num_generations, self.pad_token_id, recorder.report())

    def _decode(
        self,
        decoder: HFCacheDecoder | LlamaFamilyDecoder,
        logits: torch.Tensor,
        noise: TokenNoise,
        seen: torch.Tensor | None,
        params: SamplingParams,
        out: CompletionBuffers,
        should_stop: Callable[[], None] | None,
    ) -> None:
        """The decode loop, from the prefill's ``logits`` ``[rows, V]``: each step draws one token per row
        and records it in ``out``; rows that drew an EOS token leave the batch, the others take a step.

        ``seen`` (repetition penalty only) holds which tokens each row's prompt and completion contain.
        Until a row finishes, row i of the batch is row i of the outputs: each step's results go into
        its output column by a plain copy, not by indexing with ``active`` (fewer operations a step)."""
        device = self.device
        active = torch.arange(len(logits), device=device)  # original row of each row still in the batch
        eos = self.eos_token_ids.to(device)
        everyone, last = True, params.max_new_tokens - 1
        for step in range(params.max_new_tokens):
            if should_stop is not None:
                should_stop()
            scaled = logits.float()
            if params.temperature != 1.0:
                scaled = scaled / params.temperature
            processed, candidates = process_logits(scaled, seen, params)
            rows = None if everyone else active
            next_tokens = draw_tokens(processed, noise.exponential(rows, step, candidates), candidates)
            out.record(step, rows, next_tokens, scaled, processed)
            done = torch.isin(next_tokens, eos) if len(eos) else None
            if done is not None and bool(done.any()):
                out.finish(active[done], step)
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0 or step == last:
                    break
                decoder.select(keep)
                everyone = False
                active, next_tokens = active[keep], next_tokens[keep]
                seen = seen[keep] if seen is not None else None
            if step == last:
                break
            if seen is not None:
                seen[torch.arange(len(active), device=device), next_tokens] = True
            logits = decoder.step(next_tokens)

    def make_decoder(self, max_new_tokens: int) -> HFCacheDecoder | LlamaFamilyDecoder:
        """The decoding engine for one ``generate`` call (``self.engine``, resolved at construction)."""
        if self.engine == "fast":
            return LlamaFamilyDecoder(self.model, max_new_tokens, self.share_prompt_kv)
        return HFCacheDecoder(self.model, max_new_tokens)
