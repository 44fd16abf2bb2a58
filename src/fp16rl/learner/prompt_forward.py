"""The trainer's forward with each prompt computed once for all the completions that continue it.

Why: a GRPO group's G completions share one prompt, and a plain forward over ``prompt + completion``
rows computes that prompt G times. Here each distinct prompt of a batch runs once (U rows), its
per-layer keys and values are gathered to the N rows that continue it, and the completions then run
with them as a read-only prefix cache. The decoder layers process ``U x P + N x C`` tokens instead
of ``N x (P + C)``: at the seed's shape (prompt 8,600, 8 x 1,024) 4.6x fewer, on toy:digits with
SmolLM2 (42 + 8 x ~48) 1.7x. Gradients reach the prompt through the gather, whose backward sums
the rows' contributions, so the loss and its gradients are the plain forward's up to rounding.

The completions attend through transformers' own attention over the cached keys (the chunked
prefill path), with the same 2-D padding mask and positions as the plain forward. So any model whose
layers are all full attention over a standard KV cache, with RoPE frequencies that do not depend on the
sequence length, qualifies (``unsupported_reason``), and the trainer checks each model once on a probe
batch (``check``) before using it. The same forward also
looks the token embeddings up once and runs the completions in ``length_buckets`` (no padding to the
batch's longest completion beyond each bucket's).

The cache layers never grow: gradient checkpointing replays a layer's forward in the backward, and a
cache that appended on every call would then hold the prompt twice.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, ContextManager, Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from fp16rl.model.forward import (TokenBatch, build_token_batch, dropout_active, length_dependent_rope,
                                  not_full_attention, rope_entries)


class _PrefixLayer(DynamicLayer):
    """One layer's view of the shared prompt: ``update`` returns ``prefix + new`` keys/values and keeps
    only the latest ``new`` (what the prompt pass hands to the completion pass), so calling it again
    with the same input (a checkpoint replay) returns the same tensors."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.prefix = (keys, values) if keys is not None else None
        self.is_initialized = True
        self.keys = keys if keys is not None else torch.empty(0)
        self.values = values if values is not None else torch.empty(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefix is None:  # the prompt pass: record this layer's keys/values
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        return torch.cat([self.prefix[0], key_states], dim=-2), torch.cat([self.prefix[1], value_states], dim=-2)

    def get_seq_length(self) -> int:
        return 0 if self.prefix is None else self.prefix[0].shape[-2]


@contextmanager
def _cache_kept_under_checkpointing(layers: torch.nn.ModuleList) -> Iterator[None]:
    """Let checkpointed layers keep the cache argument (transformers drops it by default, since a cache
    that appends would be written again by the backward's replay; ``_PrefixLayer`` is replay-safe)."""
    before = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            if value is None:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = value


def unsupported_reason(decoder: torch.nn.Module) -> str | None:
    """Why the decoder stack cannot take a shared prompt cache, or None when it can: the prompt pass and
    the completion pass are two forwards, so length-dependent RoPE would give them other frequencies
    than the plain forward's one (``length_dependent_rope``)."""
    config = decoder.config.get_text_config(decoder=True)
    reason = not_full_attention(config) or length_dependent_rope(config)
    if reason is not None:
        return reason
    if config.is_encoder_decoder:
        return "the model is an encoder-decoder"
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        return f"{type(decoder).__name__} has no `layers` list"
    return None


def prompt_owners(batch: TokenBatch) -> torch.Tensor | None:
    """For each row, the index of its prompt among the batch's distinct prompts (rows sharing a prompt
    are adjacent: ``build_token_batch`` repeats each prompt G times), or None when no two rows share one."""
    width = batch.prompt_width
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]
    new = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new[1:] = (ids[1:] != ids[:-1]).any(-1) | (mask[1:] != mask[:-1]).any(-1)
    if bool(new.all()):
        return None
    return new.long().cumsum(0) - 1


def completion_hidden(decoder: torch.nn.Module, batch: TokenBatch, share_prompts: bool = False,
                      uniform: bool = False) -> torch.Tensor:
    """The decoder's last hidden states ``[N, C, H]`` at the positions that predict the completion
    tokens (position ``P - 1 + t`` predicts token t; zeros past a row's end with ``share_prompts``).

    Plain: one forward of the model over every padded row. With ``share_prompts``, the token
    embeddings are looked up once (one embedding backward, not one per forward: a ``[vocab, hidden]``
    gradient each), rows that continue the same prompt have it computed once (the prompt pass), and
    the completions run in ``length_buckets``: rows of similar length together, each bucket only as
    wide as its longest row, so a batch of short completions and one long one does not compute the
    long one's width N times.

    ``uniform`` (FSDP): the stack is called the same number of times whatever the rows, because FSDP2
    gathers a layer's shards at each call of it and every rank must make the same calls: one prompt pass
    (each row its own prompt when no two rows share one) and one completion pass over every row.
    """
    if not share_prompts:
        out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)
        start = batch.prompt_width - 1
        return out.last_hidden_state[:, start: start + batch.completion_ids.shape[1]]
    owners = prompt_owners(batch)
    embeds = decoder.get_input_embeddings()(batch.input_ids)
    lengths = batch.completion_mask.sum(-1).clamp(min=1)  # a row's columns to compute (at least one)
    if uniform:
        everyone = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        owners = everyone if owners is None else owners
        buckets = [everyone]
    else:
        buckets = length_buckets(lengths, 0 if owners is not None else batch.prompt_width)
    if owners is None:
        parts = [_rows_hidden(decoder, embeds[rows], batch.select(rows), int(lengths[rows].max())) for rows in buckets]
    else:
        parts = _shared_prompt_hidden(decoder, embeds, batch, owners, buckets, lengths)
    columns = batch.completion_ids.shape[1]
    parts = [torch.nn.functional.pad(part, (0, 0, 0, columns - part.shape[1])) for part in parts]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(buckets)))


def length_buckets(lengths: torch.Tensor, fixed: int) -> list[torch.Tensor]:
    """Row indices grouped by completion length: the split of the rows, sorted longest first, into
    runs that minimises the tokens computed, ``sum over buckets of rows x (fixed + longest)`` (``fixed``:
    the prompt tokens each row recomputes; 0 when the prompt is shared), plus a cost per extra forward
    of 1/16 of the one-bucket total, so a split is made only when it saves a real share of the work.
    Exact dynamic programme over the sorted rows (``O(N^2)``, N = rows per forward)."""
    values = lengths.tolist()
    order = sorted(range(len(values)), key=lambda row: -values[row])
    longest = [values[row] for row in order]
    count = len(order)
    per_forward = count * (fixed + longest[0]) / 16 if count else 0.0
    best, cut = [0.0] + [float("inf")] * count, [0] * (count + 1)
    for end in range(1, count + 1):
        for begin in range(end):  # rows begin..end-1, the longest of them is longest[begin]
            cost = best[begin] + (end - begin) * (fixed + longest[begin]) + per_forward
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    runs, end = [], count
    while end > 0:
        runs.append(order[cut[end]: end])
        end = cut[end]
    return [torch.tensor(sorted(run), dtype=torch.long, device=lengths.device) for run in reversed(runs)]


def _rows_hidden(decoder: torch.nn.Module, embeds: torch.Tensor, batch: TokenBatch, width: int) -> torch.Tensor:
    """One forward over each row's prompt and its first ``width`` completion columns."""
    end = batch.prompt_width + width
    out = decoder(inputs_embeds=embeds[:, :end], attention_mask=batch.attention_mask[:, :end],
                  position_ids=batch.position_ids[:, :end], use_cache=False)
    return out.last_hidden_state[:, batch.prompt_width - 1: end - 1]


def _shared_prompt_hidden(decoder: torch.nn.Module, embeds: torch.Tensor, batch: TokenBatch, owners: torch.Tensor,
                          buckets: list[torch.Tensor], lengths: torch.Tensor) -> list[torch.Tensor]:
    """Each distinct prompt run once: a prompt pass over the U distinct prompts records every layer's
    keys/values; per bucket they are given to its rows (``owners``) and a completion pass attends over
    them. The position predicting a row's token 0 is its prompt's last."""
    width = batch.prompt_width
    first = torch.nonzero(torch.diff(owners, prepend=owners.new_tensor([-1]))).squeeze(-1)  # each prompt's first row
    recorded = Cache(layers=[_PrefixLayer() for _ in decoder.layers])
    parts = []
    with _cache_kept_under_checkpointing(decoder.layers):
        prompt = decoder(inputs_embeds=embeds[first, :width], attention_mask=batch.attention_mask[first, :width],
                         position_ids=batch.position_ids[first, :width], cache=recorded, use_cache=False)
        last_prompt = prompt.last_hidden_state[:, -1]
        for rows in buckets:
            mine, end = owners[rows], width + int(lengths[rows].max())
            prefix = Cache(layers=[_PrefixLayer(_to_rows(layer.keys, mine), _to_rows(layer.values, mine))
                                   for layer in recorded.layers])
            completion = decoder(inputs_embeds=embeds[rows, width:end], attention_mask=batch.attention_mask[rows, :end],
                                 position_ids=batch.position_ids[rows, width:end], cache=prefix, use_cache=False)
            parts.append(torch.cat([last_prompt.index_select(0, mine)[:, None], completion.last_hidden_state[:, :-1]],
                                   dim=1))
    return parts


def _to_rows(states: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """A prompt's keys or values ``[U, heads, P, d]`` for each of the N rows. One prompt: a broadcast
    view, no copy (the completion pass holds the cache until its backward, so a gathered copy would
    cost ``N x P`` keys and values per layer for that long); several: gathered."""
    if states.shape[0] == 1:
        return states.expand(owners.shape[0], *states.shape[1:])
    return states.index_select(0, owners)


def _scaling_limits(config: Any) -> list[int]:
    """The sequence lengths at which a scaled RoPE (any type but default) may switch frequencies:
    ``original_max_position_embeddings``, else ``max_position_embeddings``."""
    limits = set()
    for entry in rope_entries(config):
        if entry.get("rope_type", entry.get("type", "default")) != "default":
            limit = entry.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
            if isinstance(limit, int):
                limits.add(limit)
    return sorted(limits)


def _probe_batches(config: Any, device: torch.device) -> list[TokenBatch]:
    """Two prompts of different lengths (left padding), two completions each, one shorter; with a scaled
    RoPE also the same rows moved to positions whose prompt pass ends below each scaling limit and whose
    completions pass it (``L - 1`` vs ``L + 2``): a RoPE whose frequencies follow the longest position of
    a call then gives the two forwards other frequencies, as it would on a long training sequence."""

    ids = [(k * 7919 + 13) % config.vocab_size for k in range(1, 12)]
    completions = torch.tensor([ids[:3], ids[3:6], ids[6:9], ids[8:11]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    batch = build_token_batch([ids[:6], ids[5:9]], 2, completions, mask, pad_token_id=0)
    shifted = [replace(batch, position_ids=batch.position_ids + max(0, limit - 1 - batch.prompt_width))
               for limit in _scaling_limits(config)]
    return [probe.to(device) for probe in [batch, *shifted]]


@torch.no_grad()
def check(decoder: torch.nn.Module, context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> str | None:
    """Why ``decoder`` cannot share prompts (None: it can), checked on probe batches (``_probe_batches``).
    The shared forward's hidden states must equal the plain forward's to rounding (relative 1e-4 in fp32,
    2e-2 in half precision, the bounds ``LogitHead.verify`` uses); an error or a larger difference means
    the model's attention or positions do not take the prefix cache as this module assumes."""

    reason = unsupported_reason(decoder)
    if reason is not None:
        return reason
    if dropout_active(decoder):
        return "dropout is active (the rows would share the prompt's dropout draws)"
    device = next(decoder.parameters()).device
    for batch in _probe_batches(decoder.config.get_text_config(decoder=True), device):
        try:
            with context():
                half = torch.is_autocast_enabled(device.type) or next(decoder.parameters()).dtype != torch.float32
                plain = completion_hidden(decoder, batch).float()
                shared = completion_hidden(decoder, batch, share_prompts=True).float()
        except (AttributeError, TypeError, ValueError, RuntimeError, IndexError) as err:
            return f"its forward does not take a prompt cache ({type(err).__name__}: {err})"
        rows = batch.completion_mask
        error = ((shared - plain)[rows].abs().max() / plain[rows].abs().max().clamp(min=1.0)).item()
        tolerance = 2e-2 if half else 1e-4
        if not error <= tolerance:
            at = int(batch.position_ids.max()) + 1
            return (f"the shared forward differs from the plain one by {error:.2g} (relative) on a probe batch "
                    f"({at} positions)")
    return None
