"""The trainer's view of a rollout: per-token logprobs (and entropy) from one full forward pass.

Logits may be half precision; log-probabilities are always formed in fp32. The lm_head and
log-softmax run in chunks of tokens (recomputed in backward) so that a [tokens, vocab] fp32
tensor for a whole batch never has to exist: vocabularies are 50k-150k wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenBatch:
    """Prompt + completion rows as the trainer sees them: left-padded prompt, right-padded completion."""

    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    position_ids: torch.Tensor  # [N, P + C]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] bool

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]

    def select(self, rows: torch.Tensor | slice) -> "TokenBatch":
        return TokenBatch(*(t[rows] for t in (self.input_ids, self.attention_mask, self.position_ids,
                                              self.completion_ids, self.completion_mask)))

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                   self.completion_ids, self.completion_mask)))


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: 0 at each row's first real token, pads clamped to 0.

    Sampler prefill and trainer forward must number tokens identically, or the measured mismatch
    would include a position shift; both engines take positions from here.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def build_token_batch(
    prompt_ids: Sequence[Sequence[int]],
    num_generations: int,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int,
) -> TokenBatch:
    """Join each prompt (repeated ``num_generations`` times) with its completions."""
    width = max(len(p) for p in prompt_ids)
    prompts = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        prompts[row, width - len(ids) :] = torch.as_tensor(list(ids))
        prompt_mask[row, width - len(ids) :] = 1
    prompts = prompts.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    input_ids = torch.cat([prompts, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = padded_position_ids(attention_mask)
    return TokenBatch(input_ids, attention_mask, position_ids, completion_ids, completion_mask.bool())


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    if with_entropy:
        entropy = -(logp.exp() * logp).sum(-1)
    else:
        entropy = torch.zeros_like(token_logp)
    return token_logp, entropy


def completion_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs ``[N, C]`` (fp32, 0 where masked) of the completion tokens, and entropy.

    Runs in the caller's autocast/grad context, so the trainer uses it both for pi_old (no grad)
    and for the loss (with grad).
    """
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    # hidden_states[-1] is the final-normed state; position P-1+t predicts completion token t.
    width = batch.completion_ids.shape[1]
    start = batch.prompt_width - 1
    hidden = out.hidden_states[-1][:, start : start + width]
    mask = batch.completion_mask
    flat_hidden, flat_targets = hidden[mask], batch.completion_ids[mask]
    lm_head = model.get_output_embeddings()
    parts_logp, parts_entropy = [], []
    for begin in range(0, flat_targets.shape[0], chunk_tokens):
        args = (flat_hidden[begin : begin + chunk_tokens], flat_targets[begin : begin + chunk_tokens])
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(
                _chunk_logprobs, *args, lm_head, temperature, with_entropy, use_reentrant=False
            )
        else:
            logp, entropy = _chunk_logprobs(*args, lm_head, temperature, with_entropy)
        parts_logp.append(logp)
        parts_entropy.append(entropy)
    token_logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    token_logp = token_logp.masked_scatter(mask, torch.cat(parts_logp)) if parts_logp else token_logp
    if not with_entropy:
        return token_logp, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    entropy = entropy.masked_scatter(mask, torch.cat(parts_entropy).detach()) if parts_entropy else entropy
    return token_logp, entropy
