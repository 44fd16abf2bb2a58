"""The inference engine: batched KV-cache decoding in the sampler dtype, returning token logprobs (mu).

Like vLLM, the sampler holds its own copy of the weights in its dtype and computes in it; the
trainer pushes new weights after every optimizer step (``sync_from``). The recorded logprob of
a token is taken from the *unprocessed* temperature-scaled distribution, formed in fp32, which
is exactly what the trainer evaluates; top-p/top-k/repetition penalty only shape the draw.

Speed over ``model.generate()`` comes from prefilling each prompt once and fanning its KV cache
out to the ``n`` samples, from dropping finished rows out of the batch, and from a lean loop. Two
decoding engines share that loop: ``HFCacheDecoder`` (any HF causal LM, DynamicCache) and, for
Llama/Qwen2/Mistral, ``fast_decode.LlamaFamilyDecoder`` (preallocated cache, no per-step HF
overhead; bitwise equal to the HF path in tests). Opt-in ``share_prompt_kv`` makes the fast engine
keep each prompt's K/V once for its ``n`` rows instead of copying it into each (memory at long
prompts; its own attention formula, so not bitwise equal to the HF path).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from fp16rl.rollout.fast_decode import LlamaFamilyDecoder, unsupported_reason
from fp16rl.model.forward import causal_lm, left_pad, prefill_forward
from fp16rl.model.loading import set_4bit_compute_dtype
from fp16rl.model.precision import DtypeRecorder
from fp16rl.core.seeds import derived_seed


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn; the defaults are those of the seed workload (T=1, top_p 0.95)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (divide positive logits, multiply negative)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (logprobs are those of the temperature-scaled distribution)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


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
                   kept_mass=padded("kept_mass", 1.0))

    @property
    def truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reasons]

    def completion_lists(self) -> list[list[int]]:
        return [row[mask].tolist() for row, mask in zip(self.completion_ids, self.completion_mask)]


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters (not buffers) to ``dtype``: RoPE frequencies stay fp32, as in vLLM."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


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
    ) -> Rollouts:
        """Sample ``num_generations`` completions for each prompt.

        Completion ``g`` of the prompt in slot ``slots[i]`` (default ``i``) is a pure function of
        ``(seed, slot, g)``, the prompt and the weights: its random numbers do not depend on which
        other rows exist, when they finish, the batch size or the engine (see ``TokenNoise``).
        ``max_rows`` bounds the rows decoded at once (the KV cache), in whole prompt groups.
        ``should_stop`` is called once per decoded token and may raise to abandon the call.
        """
        slots = list(range(len(prompt_ids))) if slots is None else list(slots)
        if len(slots) != len(prompt_ids) or len(set(slots)) != len(slots):
            raise ValueError(f"need one distinct slot per prompt, got {len(slots)} slots for {len(prompt_ids)} prompts")
        per_call = len(prompt_ids) if max_rows is None else max(1, max_rows // num_generations)
        with torch.inference_mode():
            parts = [self._generate(prompt_ids[i:i + per_call], num_generations, params,
                                    row_keys(seed, slots[i:i + per_call], num_generations), should_stop)
                     for i in range(0, len(prompt_ids), per_call)]
            rollouts = parts[0] if len(parts) == 1 else Rollouts.concatenate(parts, self.pad_token_id)
        # Inference-mode tensors cannot enter autograd later (the trainer indexes with the mask).
        for name in ("completion_ids", "completion_mask", "sampler_logprobs", "behaviour_logprobs", "kept_mass"):
            setattr(rollouts, name, getattr(rollouts, name).clone())
        return rollouts

    def _generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_generations: int,
        params: SamplingParams,
        keys: torch.Tensor,
        should_stop: Callable[[], None] | None,
    ) -> Rollouts:
        device = self.device
        recorder = DtypeRecorder()
        n, max_new = num_generations, params.max_new_tokens
        input_ids, attention = (t.to(device) for t in left_pad(prompt_ids, self.pad_token_id))
        batch = input_ids.shape[0] * n

        decoder = self.make_decoder(max_new)
        with recorder.watch(self.model):
            logits = decoder.prefill(input_ids, attention)
        decoder.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        noise = TokenNoise(keys.to(device), logits.shape[-1])

        seen = prompt_tokens_seen(input_ids, attention, n, logits.shape[-1]) if params.repetition_penalty != 1.0 else None

        tokens = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        behaviour = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        kept_mass = torch.ones(batch, max_new, dtype=torch.float32, device=device)
        processing = False
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
        finished_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        active = torch.arange(batch, device=device)  # original row of each row still in the batch
        eos = self.eos_token_ids.to(device)

        # Until a row finishes, row i of the batch is row i of the outputs: each step's results go into
        # its output column by a plain copy, not by indexing with ``active`` (fewer operations a step).
        everyone = True
        for step in range(max_new):
            if should_stop is not None:
                should_stop()
            scaled = logits.float()
            if params.temperature != 1.0:
                scaled = scaled / params.temperature
            processed, candidates = self._process(scaled, seen, params)
            next_tokens = self._draw(processed, noise.exponential(None if everyone else active, step, candidates),
                                     candidates)
            unprocessed_logp = torch.log_softmax(scaled, dim=-1)
            columns = [(tokens, next_tokens), (logprobs, unprocessed_logp.gather(1, next_tokens[:, None]).squeeze(1))]
            if processed is not scaled:  # else the distribution sampled is mu itself (no copy per step)
                processing = True
                columns.append((behaviour, torch.log_softmax(processed, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)))
                columns.append((kept_mass, unprocessed_logp.exp().masked_fill(processed == float("-inf"), 0.0).sum(-1)))
            for output, values in columns:
                if everyone:
                    output[:, step] = values
                else:
                    output[active, step] = values
            done = torch.isin(next_tokens, eos) if len(eos) else None
            if done is not None and bool(done.any()):
                finished_eos[active[done]] = True
                lengths[active[done]] = step + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0 or step == max_new - 1:
                    break
                decoder.select(keep)
                everyone = False
                active, next_tokens = active[keep], next_tokens[keep]
                seen = seen[keep] if seen is not None else None
            if step == max_new - 1:
                break
            if seen is not None:
                seen[torch.arange(len(active), device=device), next_tokens] = True
            logits = decoder.step(next_tokens)

        width = int(lengths.max())
        completion_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=tokens[:, :width].masked_fill(~completion_mask, self.pad_token_id).cpu(),
            completion_mask=completion_mask.cpu(),
            sampler_logprobs=logprobs[:, :width].masked_fill(~completion_mask, 0.0).cpu(),
            finish_reasons=["eos" if f else "length" for f in finished_eos.tolist()],
            num_generations=n,
            observed_dtype=recorder.report(),
            behaviour_logprobs=(behaviour if processing else logprobs)[:, :width].masked_fill(~completion_mask, 0.0).cpu(),
            kept_mass=kept_mass[:, :width].masked_fill(~completion_mask, 1.0).cpu(),
        )

    def make_decoder(self, max_new_tokens: int) -> "HFCacheDecoder | LlamaFamilyDecoder":
        """The decoding engine for one ``generate`` call (``self.engine``, resolved at construction)."""
        if self.engine == "fast":
            return LlamaFamilyDecoder(self.model, max_new_tokens, self.share_prompt_kv)
        return HFCacheDecoder(self.model, max_new_tokens)

    @staticmethod
    def _process(scaled: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of the distribution actually sampled: repetition penalty, then top-k, then top-p
        (``scaled`` itself, not a copy, when none is active). Removed tokens are ``-inf``.

        Also the candidates: ``[rows, K]`` token ids in ascending order (so the race's ties go as over
        the whole vocabulary) that include every token not removed (None: any token may be drawn), so
        the draw hashes noise for K tokens, not the whole vocabulary."""
        logits, candidates = scaled, None
        if seen is not None:
            penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if params.top_k > 0 and params.top_k < logits.shape[-1]:
            top = torch.topk(logits, params.top_k, dim=-1)
            logits = logits.masked_fill(logits < top.values[:, -1:], float("-inf"))
            if bool((torch.isfinite(logits).sum(-1) == params.top_k).all()):  # no tie at the k-th keeps more
                candidates = top.indices
        if params.top_p < 1.0:
            logits, nucleus = _top_p(logits, params.top_p)
            candidates = nucleus if nucleus is not None else candidates
        return logits, None if candidates is None else candidates.sort(dim=-1).values

    @staticmethod
    def _draw(processed: torch.Tensor, exponential: torch.Tensor, candidates: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Sample one token per row from the processed distribution (``_process``).

        Exponential race: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` independent draws token ``v``
        with probability ``p_v`` exactly (the Gumbel-max trick in another form), and is much cheaper
        on CPU than ``torch.multinomial``. Tokens the processing removed have ``p = 0`` and never win.
        With the same ``E`` and nearly the same ``p`` (bf16 vs fp16 arms) the same token wins unless
        two candidates are nearly tied: that is what keeps paired arms' completions identical.

        With ``candidates`` (ascending ids, ``[rows, K]``) ``exponential`` is their noise and the race
        runs among them: every other token has ``p = 0``, so the winner is the full race's.
        """
        probs = torch.softmax(processed, dim=-1)
        if candidates is None:
            return (probs / exponential).argmax(dim=-1)
        race = probs.gather(1, candidates) / exponential
        return candidates.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)


# Candidate counts tried, row by row, before sorting the whole vocabulary for top-p: a peaked row reaches
# top_p within its first 64 tokens (a 49k-token sort costs ~30 ms per step on a CPU core, top-64 0.4 ms).
_TOP_P_CANDIDATES = (64, 1024)


def _top_p(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nucleus filtering: keep the smallest prefix of tokens, by probability, whose mass reaches
    ``top_p`` (a token is dropped when the mass before it is ``>= top_p``; at least one is kept).

    Each row takes its top 64, then 1024 tokens, then the whole vocabulary sorted, until the prefix
    holds ``top_p``: the cumulative sums are those of a full sort, so the kept set is too. Returns the
    filtered logits and ``[rows, K]`` ids holding every kept token (a row with fewer repeats its first),
    or None when a row needed the whole vocabulary."""
    probs = logits.softmax(-1)
    rows, vocab = probs.shape
    keep = torch.zeros_like(probs, dtype=torch.bool)
    todo, stages = torch.arange(rows, device=probs.device), []
    for k in (*_TOP_P_CANDIDATES, vocab):
        if k >= vocab:
            values, order = probs[todo].sort(dim=-1, descending=True)
        else:
            values, order = probs[todo].topk(k, dim=-1)
        mass = values.cumsum(-1)
        # Beyond the k-th token nothing is kept once the k tokens hold top_p.
        reached = torch.ones_like(todo, dtype=torch.bool) if k >= vocab else mass[:, -1] >= top_p
        done, order = todo[reached], order[reached]
        keep[done] = torch.zeros(len(done), vocab, dtype=torch.bool, device=probs.device).scatter(
            1, order, (mass - values)[reached] < top_p)
        stages.append((done, order))
        todo = todo[~reached]
        if todo.numel() == 0:
            break
    filtered = logits.masked_fill(~keep, float("-inf"))
    width = max(order.shape[1] for _, order in stages)
    if width >= vocab:
        return filtered, None
    candidates = torch.empty(rows, width, dtype=torch.long, device=probs.device)
    for done, order in stages:
        candidates[done] = torch.cat([order, order[:, :1].expand(-1, width - order.shape[1])], dim=1)
    return filtered, candidates


def prompt_tokens_seen(input_ids: torch.Tensor, attention: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """``[P * n, vocab]`` bool: which tokens each row's prompt holds (the repetition penalty's start)."""
    # Pad positions point at an extra column that is dropped, so only real tokens count.
    prompt_tokens = input_ids.masked_fill(attention == 0, vocab).repeat_interleave(n, dim=0)
    seen = torch.zeros(prompt_tokens.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, prompt_tokens, True)[:, :vocab].contiguous()


# --- randomness that pairs arms ----------------------------------------------------------------

_HASH_MULTIPLIER = 0x45D9F3B  # Thomas Mueller's 32-bit integer hash; < 2^27 so int64 products never overflow
_LOW32 = 0xFFFFFFFF


def mix32(x: Any) -> Any:
    """A 32-bit integer hash of ints, or of int64 tensors holding values in [0, 2^32): every bit avalanches."""
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _LOW32
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _LOW32
    return (x >> 16) ^ x


def row_keys(seed: int, slots: Sequence[int], num_generations: int) -> torch.Tensor:
    """One 32-bit key per completion row (prompt-major, as rows are laid out): a hash of (seed, slot, g)."""
    keys = [derived_seed(seed, slot, g) for slot in slots for g in range(num_generations)]
    return torch.tensor(keys, dtype=torch.int64)


class TokenNoise:
    """Counter-based Exp(1) noise: ``E[row, position, token] = -log U(hash(key_row, position, token))``.

    Every number is a pure function of the row's key, the token position and the token id, computed
    with integer hashing on the device: no generator state is shared between rows, so a row's draws
    are the same whichever other rows exist or finish and whichever engine or device runs it.
    ``U = (h >> 8 + 1/2) / 2^24`` lies in (0, 1), so ``E`` is finite and positive.

    Why blocks: a decode step of a small model is bound by its number of operations, and the noise was
    ~20 of them a step (~70 us of ~430 on a CPU core for 8 rows of a 512-token vocabulary). The rows'
    position hashes are computed for ``POSITIONS`` positions at once, and the whole-vocabulary noise
    (top_p 1, no top_k) for as many positions as fit ``block_bytes``; a step then indexes. The numbers
    are the same elementwise operations on the same integers, so the same noise.
    """

    POSITIONS = 64

    # 256 KB blocks stay in a core's cache through the ~20 passes: 1 MB ones were slower than none at 32
    # rows of 512 tokens (63 against 60 us a step; 36 with 256 KB), bench/RESULTS.md.
    def __init__(self, keys: torch.Tensor, vocab_size: int, block_bytes: int = 256 * 2**10):
        self.keys = keys
        self.token_hash = _as_int32(mix32((torch.arange(vocab_size, device=keys.device) * 0x9E3779B1 + 0x7F4A7C15)
                                          & _LOW32))
        self.bases: tuple[int, torch.Tensor] | None = None  # (first position, [rows, POSITIONS] int32)
        self.vocab_positions = min(self.POSITIONS, block_bytes // (4 * vocab_size * max(1, len(keys))))
        self.vocab_noise: tuple[int, torch.Tensor] | None = None  # (first position, [rows, positions, vocab])

    def exponential(self, rows: torch.Tensor | None, position: int, tokens: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """``[len(rows), vocab]`` fp32 noise for rows ``rows`` (indices into the keys; None: every key's
        row, in order) at ``position``; with ``tokens`` (``[len(rows), K]`` ids) only theirs, the same
        numbers."""
        if tokens is None and self.vocab_positions > 1:
            if self.vocab_noise is None or not 0 <= position - self.vocab_noise[0] < self.vocab_positions:
                bases = self._bases(position, self.vocab_positions)  # [all rows, positions]
                self.vocab_noise = (position, self._noise(bases[:, :, None] ^ self.token_hash))
            start, noise = self.vocab_noise
            noise = noise[:, position - start]
            return noise if rows is None else noise.index_select(0, rows)
        token_hash = self.token_hash[None, :] if tokens is None else self.token_hash[tokens]
        bases = self._bases(position, 1)
        bases = bases if rows is None else bases.index_select(0, rows)
        return self._noise(bases[:, None] ^ token_hash)

    def _bases(self, position: int, count: int) -> torch.Tensor:
        """``[all rows, count]`` int32 row-position hashes for positions ``position ..``; with ``count``
        1, ``[all rows]`` at ``position``, taken from a cached block of ``POSITIONS``."""
        if self.bases is None or not self.bases[0] <= position <= self.bases[0] + self.POSITIONS - count:
            positions = torch.arange(position, position + max(count, self.POSITIONS), device=self.keys.device)
            position_hash = mix32((positions * 0x85EBCA6B + 0x165667B1) & _LOW32)
            self.bases = (position, _as_int32(mix32(self.keys[:, None] ^ position_hash)))
        start, bases = self.bases
        offset = position - start
        return bases[:, offset] if count == 1 else bases[:, offset:offset + count]

    @staticmethod
    def _noise(hashes: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise from the row-position-token hashes before their final mix."""
        bits = _mix32_int32(hashes)
        bits >>= 8
        bits &= 0xFFFFFF
        return exponential_from_bits(bits)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 tensor of the same 32 bits (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on the 32 bits held in an int32 tensor, the same bits out.

    Why: the ``[rows, vocab]`` hash is the noise's cost at top_p 1 (7 ms a step for 8 rows of a 49k
    vocabulary in int64, whose multiply AVX2 lacks). In int32 the product wraps modulo 2^32 as the int64
    one masked to 32 bits does, and a logical shift right by 16 is the arithmetic one masked to 16 bits."""
    # In place on fresh tensors: one allocation a round instead of four (the same operations).
    for multiply in (True, True, False):
        y = x >> 16
        y &= 0xFFFF
        y ^= x
        if multiply:
            y *= _HASH_MULTIPLIER
        x = y
    return x


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws ``-log u`` from 24 uniform bits, ``u = (bits + 0.5) / 2^24``, always > 0.

    In fp32 the top value ``(2^24 - 0.5) / 2^24`` rounds to exactly 1, and ``-log 1 = -0`` would make
    the race divide by zero: ``0 / -0`` is NaN, which ``argmax`` picks, so a token that top-p/top-k had
    removed would be drawn (seen on SmolLM2: once in a few hundred row-steps of a 49k vocabulary). ``u``
    is capped at the largest fp32 below 1; every other value is unchanged.
    """
    uniform = bits.to(torch.float32, copy=True)  # the rest in place on this copy
    uniform.add_(0.5).mul_(1.0 / 2**24).clamp_(max=1.0 - 2**-24)
    return uniform.log_().neg_()


class HFCacheDecoder:
    """Incremental decoding through any Hugging Face causal LM and its ``DynamicCache``.

    The state of one ``generate`` call: KV cache, attention mask and positions of the rows still
    decoding. ``prefill`` -> ``repeat_interleave(n)`` -> (``step`` | ``select``)*.
    """

    def __init__(self, model: torch.nn.Module, max_new_tokens: int):
        self.model = model
        self.max_new_tokens = max_new_tokens

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts; return the logits of their last position ``[P, V]``."""
        out = prefill_forward(self.model, input_ids, attention_mask)
        self.cache = out.cache
        width = input_ids.shape[1]
        # The mask for the whole call, filled column by column (no concatenation per step).
        self.mask = torch.zeros(
            input_ids.shape[0], width + self.max_new_tokens, dtype=torch.long, device=input_ids.device
        )
        self.mask[:, :width] = attention_mask
        self.positions = attention_mask.sum(-1) - 1  # position of each row's last token
        self.length = width
        return out.logits[:, -1]

    def repeat_interleave(self, n: int) -> None:
        """Fan each prompt's state out to ``n`` rows (prefix sharing: one prefill per prompt)."""
        self.cache.batch_repeat_interleave(n)
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.positions = self.positions.repeat_interleave(n, dim=0)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep``: finished rows leave the batch."""
        self.cache.batch_select_indices(keep)
        self.mask, self.positions = self.mask[keep], self.positions[keep]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next-token logits ``[B, V]``."""
        self.mask[:, self.length] = 1
        self.length += 1
        self.positions = self.positions + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask[:, : self.length],
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]
