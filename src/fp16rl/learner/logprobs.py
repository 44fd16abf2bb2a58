"""The trainer's view of a rollout: per-token logprobs (and entropy) from one full forward pass.

The backbone runs once over prompt + completion and only its last hidden state is kept (no
per-layer hidden states). The output head then runs in chunks of completion tokens (recomputed in
backward) so that a ``[tokens, vocab]`` fp32 tensor for a whole batch never exists: vocabularies
are 50k-150k wide. Logits may be half precision; log-probabilities are always formed in fp32.

The head is the model's own ``lm_head`` followed by the model's own final logit processing
(Gemma's ``final_logit_softcapping``, Granite's ``logits_scaling``, Cohere's ``logit_scale``,
Falcon-H1's ``lm_head_multiplier``), the same operations in the same order as the model's
``forward``, so the trainer scores exactly the distribution the sampler draws from. A model whose
logits this does not reproduce is refused (``LogitHead.verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from fp16rl.core.errors import ModelError
from fp16rl.learner.prompt_forward import completion_hidden
from fp16rl.model.forward import TokenBatch, backbone, causal_lm


@dataclass
class LogitHead:
    """``lm_head`` plus the model's final logit processing, as its ``forward`` applies them."""

    lm_head: torch.nn.Module
    softcap: float | None = None  # logits / c -> tanh -> * c
    divide_by: float | None = None  # logits / s (Granite's logits_scaling)
    multiply_by: float | None = None  # logits * s (Cohere's logit_scale, Falcon-H1's lm_head_multiplier)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "LogitHead":
        lm = causal_lm(model)
        config = lm.config
        multiplier = getattr(config, "logit_scale", None)
        if multiplier is None:
            multiplier = getattr(config, "lm_head_multiplier", None)
        return cls(lm_head=lm.get_output_embeddings(), softcap=getattr(config, "final_logit_softcapping", None),
                   divide_by=getattr(config, "logits_scaling", None), multiply_by=multiplier)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.divide_by is not None:
            logits = logits / self.divide_by
        if self.multiply_by is not None:
            logits = logits * self.multiply_by
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    @torch.no_grad()
    def verify(self, model: torch.nn.Module, context: Callable = torch.no_grad) -> float:
        """Check on a short probe sequence that backbone + this head give the model's own logits.

        Returns the largest difference relative to the logits' scale; raises ``ModelError`` when the
        model post-processes its logits in a way this head does not reproduce.
        """
        lm = causal_lm(model)
        device = self.lm_head.weight.device
        vocab = self.lm_head.weight.shape[0]
        ids = (torch.arange(1, 17, device=device) * 7919 % vocab)[None]
        try:
            with context():
                expected = model(input_ids=ids, use_cache=False).logits.float()
                ours = self(backbone(model)(input_ids=ids, use_cache=False).last_hidden_state).float()
        except (AttributeError, TypeError, RuntimeError) as err:  # no decoder stack / last_hidden_state
            raise ModelError(f"model class {type(lm).__name__} has no decoder stack fp16rl can run on its own "
                             f"({type(err).__name__}: {err}); this model is not supported") from None
        scale = expected.abs().max().clamp(min=1.0)
        error = ((ours - expected).abs().max() / scale).item()
        tolerance = 1e-4 if self.lm_head.weight.dtype == torch.float32 else 2e-2
        if not error <= tolerance:
            raise ModelError(
                f"model class {type(lm).__name__} post-processes its logits in a way fp16rl does not reproduce "
                f"(relative difference {error:.2g} on a probe sequence); the trainer's logprobs would not be the "
                "sampler's distribution, so this model is not supported")
        return error


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: LogitHead, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    if with_entropy:  # telemetry only (returned detached): no graph, so no [tokens, vocab] kept for it
        with torch.no_grad():
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
    head: LogitHead | None = None,
    run_backbone: Callable[..., Any] | None = None,
    share_prompts: bool = False,
    tap: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs ``[N, C]`` (fp32, 0 where masked) of the completion tokens, and entropy.

    Runs in the caller's autocast/grad context, so the trainer uses it both for pi_old (no grad)
    and for the loss (with grad). ``log pi(y_t) = log_softmax(head(h_{P-1+t}) / T)[y_t]``.
    ``run_backbone`` replaces ``completion_hidden`` over ``backbone(model)`` (data-parallel training
    passes its DDP/FSDP wrapper, whose one forward runs it); ``share_prompts``: each prompt shared by
    several rows is computed once (``prompt_forward``). ``tap(hidden)`` sees the last hidden states
    ``[N, C, H]`` (position t predicts token t) before the head: the full-vocabulary parity reads a few
    positions' whole distributions from them (``measure/vocab.py``) without another forward.
    """
    head = head or LogitHead.of(model)
    if run_backbone is not None:
        hidden = run_backbone(tokens=batch, share_prompts=share_prompts)
    else:
        hidden = completion_hidden(backbone(model), batch, share_prompts)
    if tap is not None:
        tap(hidden)
    mask = batch.completion_mask
    flat_hidden, flat_targets = hidden[mask], batch.completion_ids[mask]
    parts_logp, parts_entropy = [], []
    # Recomputing a chunk in backward saves memory only when there are several: a single chunk's logits
    # are as alive at the head's backward (with the backbone's activations) as its recompute would be.
    recompute = torch.is_grad_enabled() and flat_targets.shape[0] > chunk_tokens
    for begin in range(0, flat_targets.shape[0], chunk_tokens):
        args = (flat_hidden[begin: begin + chunk_tokens], flat_targets[begin: begin + chunk_tokens])
        if recompute:
            logp, entropy = checkpoint(_chunk_logprobs, *args, head, temperature, with_entropy, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args, head, temperature, with_entropy)
        parts_logp.append(logp)
        parts_entropy.append(entropy)
    token_logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    token_logp = token_logp.masked_scatter(mask, torch.cat(parts_logp)) if parts_logp else token_logp
    if not with_entropy:
        return token_logp, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    entropy = entropy.masked_scatter(mask, torch.cat(parts_entropy).detach()) if parts_entropy else entropy
    return token_logp, entropy
