"""How the sampler draws one token per row: its parameters, the logits processing, the race.

The recorded logprob (mu) is that of the temperature-scaled distribution; repetition penalty, top-k
and top-p only shape the distribution actually drawn from (``process_logits``). ``draw_tokens``
runs the exponential race over it with ``noise.TokenNoise``'s numbers, among the candidate tokens
the processing kept where it can name them (``top_p_filter``), so that the noise is hashed for K
tokens instead of the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def process_logits(scaled: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams
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
        logits, nucleus = top_p_filter(logits, params.top_p)
        candidates = nucleus if nucleus is not None else candidates
    return logits, None if candidates is None else candidates.sort(dim=-1).values


def draw_tokens(processed: torch.Tensor, exponential: torch.Tensor, candidates: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Sample one token per row from the processed distribution (``process_logits``).

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


def top_p_filter(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
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
