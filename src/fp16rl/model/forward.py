"""What both engines share about running a causal LM: the token batch they score, positions of
left-padded rows, the prefill pass, and which architectures the shared-prompt forward and the fast
decoder may assume (full causal attention, static RoPE).

The sampler (``fp16rl.rollout``) and the trainer (``fp16rl.learner``) both take these from here, so
they number tokens and unwrap models identically: a difference here would be measured as mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


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


def prefill_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The prompt pass both decoding engines start with: left-padded prompts, their positions, a KV
    cache, logits of the last position only."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=padded_position_ids(attention_mask),
                 use_cache=True, logits_to_keep=1)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[P, L]`` ids and attention mask (sampler prefill and trainer batches alike)."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError("empty prompt")
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    return ids, mask


def build_token_batch(
    prompt_ids: Sequence[Sequence[int]],
    num_generations: int,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int,
) -> TokenBatch:
    """Join each prompt (repeated ``num_generations`` times) with its completions."""
    prompts, prompt_mask = left_pad(prompt_ids, pad_token_id)
    prompts = prompts.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    input_ids = torch.cat([prompts, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = padded_position_ids(attention_mask)
    return TokenBatch(input_ids, attention_mask, position_ids, completion_ids, completion_mask.bool())


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside ``model`` (a peft ``PeftModel`` is unwrapped; its LoRA layers stay)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (LoRA layers inside it stay active)."""
    return causal_lm(model).get_decoder()


def not_full_attention(config: Any) -> str | None:
    """Why a model's layers are not all full causal attention (a sliding window, other layer kinds), or
    None: what both the shared prompt here and the fast decoder's own attention assume."""
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention is configured"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))} are not all full_attention"
    return None


def rope_entries(config: Any) -> list[dict[str, Any]]:
    """The RoPE parameter sets of a text config (one, or one per layer type), ``{}`` for plain RoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return [{}]
    if params and all(isinstance(value, dict) for value in params.values()):  # per layer type
        return list(params.values())
    return [params]


def length_dependent_rope(config: Any) -> str | None:
    """Why this model's RoPE frequencies depend on the sequence length, or None when they do not.

    transformers' ``dynamic_rope_update`` picks the frequencies of every position of a forward from the
    longest position in that call, ``L = max(position_ids) + 1``: ``dynamic`` (and ``*dynamic*``) NTK
    scaling recomputes them for ``L`` once it passes ``max_position_embeddings`` (and keeps them until a
    shorter call resets them), ``longrope`` takes its long factors when ``L > original_max_position_embeddings``.
    The static types (default, linear, llama3, yarn...) give a position the same frequencies in every call:
    the distinction ``fast_decode`` makes for its rotary table. So with a length-dependent type the same
    token gets other logits in a forward over the prompt alone than in one over prompt + completion, and
    the sampler's token-by-token decoding than the trainer's forward over the whole sequence."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for entry in rope_entries(config):
        kind = entry.get("rope_type", entry.get("type", "default"))
        if not isinstance(kind, str) or "dynamic" in kind or kind == "longrope":
            limit = entry.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
            return (f"its RoPE (rope_type {kind}) takes its frequencies from the longest position of each forward "
                    f"(they change once a sequence passes {limit} positions)")
    return None


def dropout_active(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` is random (a dropout layer in training mode): its logprobs then
    differ from a no-grad forward's, so they cannot stand for pi_old."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())
