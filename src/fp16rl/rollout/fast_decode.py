"""A lean decode loop for Llama-family models (Llama, Qwen2, Mistral), with or without peft LoRA.

Why: on small models each ``model(...)`` decode step through Hugging Face spends most of its
time outside the maths (mask building, ``DynamicCache`` concatenation per layer, config
look-ups, output dataclasses). This decoder keeps a preallocated KV cache written in place and
an attention mask it updates one column per step, and runs the model's own modules (embedding,
RMSNorms, projections, MLP, rotary embedding, lm_head) with the same operations, order and shapes
as the Hugging Face layer. A small model's step is bound by its number of operations, so plain
modules run as their forward's functions (``_lean``: ``F.linear``, ``F.embedding``, ``F.silu``, the
RMSNorm formula, ``F.rms_norm`` in fp32; a LoRA projection as peft's operations; any module with hooks,
or of another type, as a module), and static RoPE's cos/sin are computed once per call for every
position it reaches and looked up per step. The prefill runs once through the Hugging Face model
itself and its cache is copied in.

Attention mirrors transformers' own choice per step: SDPA without a mask (``enable_gqa``) when
no row has padding, otherwise SDPA with the mask and the query heads packed onto their key/value
head (``pack_gqa``); for ``attn_implementation="eager"`` the eager formula (softmax in fp32).

Measured against ``HFCacheDecoder`` (transformers 5.23, torch 2.13 CPU; tiny Llama/Qwen2 with and
without LoRA, Mistral, llama3 rope scaling, SmolLM2-135M): logits bitwise equal at every step in
float32, bfloat16 and float16. The tests require <= 1e-5 in fp32 and a few ulps in half precision,
since other kernels or versions may round differently (the RoPE table, for one, takes cos/sin over
all positions in one call, where transformers takes them over ``[rows, 1]`` positions each step).

Opt-in ``share_prompt_kv`` (``SharedPromptKV``): each prompt's K/V is kept once instead of being
copied into each of its G rows, which saves ``(G - 1) x prompt tokens x KV bytes per token`` per
prompt (7.9 GB at the seed's 8B shape), and reads each prompt's K/V once per step for all of its
rows (faster decode at long prompts, bench/RESULTS.md). Its attention is this module's own formula,
not transformers' kernel, so it is not bitwise equal to the default path (fp32: <= 1e-5 in tests).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from fp16rl.model.forward import causal_lm, length_dependent_rope, not_full_attention, prefill_forward
from fp16rl.model.islands import hidden_like
from fp16rl.model.half_matmul import WidenedLinear, widened_with

# Exact classes, not subclasses: a subclass may override the layer forward this loop re-implements.
SUPPORTED_CLASSES = (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)
SUPPORTED_ATTENTION = ("sdpa", "eager")
RMS_NORMS = (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)  # one forward, written out in ``_lean_norm``


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fast path cannot run ``model`` faithfully, or None when it can."""
    lm = causal_lm(model)
    if type(lm) not in SUPPORTED_CLASSES:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_CLASSES)
        return f"model class {type(lm).__name__} is not one of {names}"
    config = lm.config
    if config._attn_implementation not in SUPPORTED_ATTENTION:
        return f"attention implementation {config._attn_implementation!r} is not sdpa or eager"
    reason = not_full_attention(config)
    if reason is not None:
        return reason
    if lm.training:
        return "model is in training mode (dropout)"
    return None


def _hooked(module: torch.nn.Module) -> bool:
    """Whether forward hooks would run around ``module`` (then only a module call does what it does)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
                or _global_forward_pre_hooks)


def _lean(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward for the decode loop, without ``nn.Module.__call__``'s bookkeeping (~1.4 us a
    call on a CPU, a visible share of a small model's step: bench/RESULTS.md).

    A plain ``nn.Linear`` is ``F.linear(x, weight, bias)``, its own forward (a ``WidenedLinear``: ``widened_with``); a plain ``nn.Embedding`` is
    ``F.embedding`` (not with ``max_norm``, which rewrites rows; its other options only shape gradients).
    A peft LoRA ``Linear`` with one plain adapter (no dropout, no variant, in the input's dtype) runs
    peft's own operations, ``base(x) + B(A(x)) * scaling``, without its per-call bookkeeping (adapter
    loops, dtype checks, three module calls); it checks the adapter is still enabled and unmerged at
    each call and falls back to ``module`` otherwise. Anything else (quantised layers, modules with
    hooks) is ``module`` itself."""
    from peft.tuners.lora import Linear as LoraLinear

    if _hooked(module):
        return module
    if type(module) in (torch.nn.Linear, WidenedLinear):
        return _lean_linear(module)
    if type(module) is torch.nn.Embedding and module.max_norm is None:  # max_norm renormalises rows in place
        return partial(F.embedding, weight=module.weight, padding_idx=module.padding_idx)
    if type(module) is not LoraLinear or len(module.active_adapters) != 1:
        return module
    name = module.active_adapters[0]
    if name not in module.lora_A or name in module.lora_variant:  # DoRA and the other variants
        return module
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    plain = (isinstance(module.lora_dropout[name], torch.nn.Identity)
             and all(type(layer) in (torch.nn.Linear, WidenedLinear) for layer in (base, lora_a, lora_b)) and lora_a.bias is None
             and lora_b.bias is None and lora_a.weight.dtype == base.weight.dtype)
    if not plain:
        return module
    scaling = module.scaling[name]
    linear, linear_a, linear_b = _lean_linear(base), _lean_linear(lora_a), _lean_linear(lora_b)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.disable_adapters or module.merged or x.dtype != lora_a.weight.dtype:
            return module(x)
        return linear(x) + linear_b(linear_a(x)) * scaling

    return forward


def _lean_linear(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain linear layer's forward with its weights bound: ``F.linear``, or for a ``WidenedLinear``
    ``widened_with`` (its float32 weights made once per decoder, which lives for one ``generate``)."""
    if type(layer) is WidenedLinear:
        return widened_with(layer.weight, layer.bias)
    return partial(F.linear, weight=layer.weight, bias=layer.bias)


def _lean_mlp(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP's forward as Llama/Qwen2/Mistral write it, ``down(act(gate(x)) * up(x))``, with
    ``_lean`` projections and SiLU as ``F.silu`` (its forward); the module itself if it has hooks."""
    if _hooked(mlp):
        return mlp
    gate, up, down = _lean(mlp.gate_proj), _lean(mlp.up_proj), _lean(mlp.down_proj)
    act = mlp.act_fn
    if type(act) in (torch.nn.SiLU, SiLUActivation) and not _hooked(act):
        act = F.silu
    return lambda x: down(act(gate(x)) * up(x))


def _lean_norm(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Llama/Qwen2/Mistral's RMSNorm forward, the same operations in the same order (the tests hold it
    bitwise equal to the module in fp32, bf16 and fp16), without the module call::

        y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)     x32 = x in fp32

    With x and weight in fp32 there is no cast, and ``F.rms_norm`` runs these operations (pow, mean,
    + eps, rsqrt, two products) in one call from C++: ~3 us less per norm on a CPU core. In half
    precision it would round once where the module rounds twice, so there the formula runs.
    """
    if type(norm) not in RMS_NORMS or _hooked(norm):
        return norm
    weight, eps = norm.weight, norm.variance_epsilon
    shape = tuple(weight.shape)

    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, eps)
        x = x.to(torch.float32)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)

    return forward


class SharedPromptKV:
    """The prompts' K/V stored once per prompt, shared by the rows decoding from it (``share_prompt_kv``).

    Why: fanning a prompt's K/V out to its G rows copies it G - 1 times, and at long prompts those
    copies are most of the sampler's KV cache. Here each layer holds ``[P, kv_heads, prompt_width,
    head_dim]`` once; the rows keep only their own completion K/V (in the decoder's buffers).
    ``row_prompt`` maps each live row to its prompt and ``row_slot`` to its place among that prompt's
    rows (its generation index), so the per-prompt products run on a ``[P, kv_heads, slots x groups]``
    grid of queries: a prompt's keys and values are read once per step for all of its rows, which are
    batched as a matrix (slots of rows that finished hold zeros and are never read back).

    Attention of query head ``h`` (key/value head ``j = h // groups``, as transformers' GQA) of row
    ``r`` with prompt ``p = row_prompt[r]``, one softmax over the union of the prompt's ``W`` columns
    and the row's own ``F`` completion columns::

        s_prompt = scaling * q K_prompt[p, j]^T + b[p]    b = 0 at real prompt tokens, -inf at padding
        s_own    = scaling * q K_own[r, j]^T
        w        = softmax_fp32([s_prompt, s_own]).to(dtype)     (scores in the model dtype, as eager)
        out      = w[:W] @ V_prompt[p, j] + w[W:] @ V_own[r, j]

    Equal to attention over the concatenated keys up to rounding; the two partial products are rounded
    to the dtype before their sum, and transformers' SDPA kernels sum in another order, which is why
    the mode is opt-in: the sampler's logprobs (mu) are what the project measures against the trainer.
    The union is never empty (the row's newest token is always in it), so -inf padding cannot make NaN.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], attention_mask: torch.Tensor,
                 groups: int):
        self.keys = [k.contiguous() for k in keys]  # per layer [P, kv_heads, W, D]; contiguous for the matmuls
        self.values = [v.contiguous() for v in values]
        self.groups = groups
        prompts = attention_mask.shape[0]
        self.bias = torch.zeros(attention_mask.shape, dtype=self.keys[0].dtype, device=attention_mask.device)
        self.bias.masked_fill_(attention_mask == 0, float("-inf"))
        self.prompts = prompts  # live prompts: the first ``prompts`` entries of the buffers
        self.slots = 1
        self.row_prompt = torch.arange(prompts, device=attention_mask.device)
        self.row_slot = torch.zeros(prompts, dtype=torch.long, device=attention_mask.device)

    def fan_out(self, n: int) -> None:
        """Each row becomes ``n`` consecutive rows of the same prompt (no K/V is copied)."""
        fanned = torch.arange(n, device=self.row_slot.device)
        self.row_slot = (self.row_slot[:, None] * n + fanned).reshape(-1)
        self.row_prompt = self.row_prompt.repeat_interleave(n)
        self.slots *= n

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep``; a prompt none of whose rows is left is dropped (buffers compacted in place)."""
        self.row_slot = self.row_slot[keep]
        alive, self.row_prompt = torch.unique(self.row_prompt[keep], return_inverse=True)
        count = alive.numel()
        if count < self.prompts:
            for buffer in (*self.keys, *self.values, self.bias):
                buffer[:count] = buffer[alive]
            self.prompts = count

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Query ``[B, H, D]`` against its prompt's keys and its own ``keys``/``values`` ``[B, kv_heads,
        F, D]`` -> ``[B, 1, H * D]`` (the formula in the class docstring)."""
        rows, heads, dim = query.shape
        prompts, slots, groups = self.prompts, self.slots, self.groups
        kv_heads = heads // groups
        prompt_keys, prompt_values = self.keys[layer][:prompts], self.values[layer][:prompts]
        width = prompt_keys.shape[2]
        query = query.view(rows, kv_heads, groups, dim)
        # Advanced indices around a slice: the row dimension comes first, [B, kv_heads, groups, ...].
        where = (self.row_prompt, slice(None), self.row_slot)
        grid = query.new_zeros(prompts, kv_heads, slots, groups, dim)
        grid[where] = query
        prompt_scores = torch.matmul(grid.view(prompts, kv_heads, slots * groups, dim), prompt_keys.transpose(2, 3))
        prompt_scores = prompt_scores * scaling + self.bias[:prompts, None, None]
        prompt_scores = prompt_scores.view(prompts, kv_heads, slots, groups, width)[where]
        own_scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        weights = F.softmax(torch.cat((prompt_scores, own_scores), dim=-1), dim=-1, dtype=torch.float32)
        weights = weights.to(query.dtype)
        weight_grid = weights.new_zeros(prompts, kv_heads, slots, groups, width)
        weight_grid[where] = weights[..., :width]
        from_prompt = torch.matmul(weight_grid.view(prompts, kv_heads, slots * groups, width), prompt_values)
        out = from_prompt.view(prompts, kv_heads, slots, groups, dim)[where] + torch.matmul(weights[..., width:], values)
        return out.reshape(rows, 1, heads * dim)


class LlamaFamilyDecoder:
    """Incremental decoding for one ``generate`` call; same interface as ``HFCacheDecoder``.

    State: per layer K/V buffers ``[rows, kv_heads, capacity, head_dim]`` whose first ``length``
    columns are filled, and each row's position. By default the buffers hold prompt and completion
    (capacity ``prompt_width + max_new_tokens``) with an additive key mask ``[rows, capacity]``; with
    ``share_prompt_kv`` they hold the completion only (capacity ``max_new_tokens``) and ``shared`` the
    prompts' K/V, once per prompt. ``select`` compacts rows to the front of the buffers in place.
    """

    def __init__(self, model: torch.nn.Module, max_new_tokens: int, share_prompt_kv: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fast decoder cannot run this model: {reason}")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.share_prompt_kv = share_prompt_kv
        self.shared: SharedPromptKV | None = None
        lm: PreTrainedModel = causal_lm(model)
        body = lm.model
        self.embed_tokens = body.embed_tokens
        self.embed = _lean(body.embed_tokens)
        # Modules resolved once: nn.Module attribute look-ups are a visible share of a tiny model's step.
        self.layers = [
            (
                _lean_norm(layer.input_layernorm),
                _lean(layer.self_attn.q_proj),
                _lean(layer.self_attn.k_proj),
                _lean(layer.self_attn.v_proj),
                _lean(layer.self_attn.o_proj),
                layer.self_attn.scaling,
                _lean_norm(layer.post_attention_layernorm),
                _lean_mlp(layer.mlp),
            )
            for layer in body.layers[: lm.config.num_hidden_layers]
        ]
        self.norm = _lean_norm(body.norm)
        self.rotary_emb = body.rotary_emb
        # Static RoPE (default, linear, llama3, yarn...): cos/sin are a function of the position alone, so
        # they are computed once per call for every position it reaches; dynamic and longrope frequencies
        # depend on the longest position seen, so those run the module at every step as transformers does.
        # The rule is ``fp16rl.model.forward.length_dependent_rope``'s, read from the config the rotary
        # module takes its ``rope_type`` from.
        self.rope_table = length_dependent_rope(lm.config) is None
        self.lm_head = _lean(lm.lm_head)
        self.eager = lm.config._attn_implementation == "eager"
        attn = body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.half = self.head_dim // 2
        weight = hidden_like(self.embed_tokens)  # rotary cos/sin come in the hidden states' dtype
        self.sin_sign = torch.tensor([-1.0] * self.half + [1.0] * self.half, dtype=weight.dtype, device=weight.device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts through the Hugging Face model; keep its cache; return last-position logits."""
        out = prefill_forward(self.model, input_ids, attention_mask)
        rows, width = input_ids.shape
        layers = out.cache.layers[: len(self.layers)]
        self.positions = attention_mask.sum(-1) - 1
        self.rows = rows
        self.rotary = None
        if self.rope_table:  # every position this call can reach: width - 1 + max_new_tokens at most
            positions = torch.arange(width + self.max_new_tokens, device=input_ids.device)[None]
            cos, sin = self.rotary_emb(hidden_like(self.embed_tokens), positions)  # in the hidden states' dtype
            self.rotary = torch.stack((cos[0], sin[0] * self.sin_sign), dim=1)  # [positions, 2, head_dim]
        if self.share_prompt_kv:
            self.shared = SharedPromptKV([layer.keys for layer in layers], [layer.values for layer in layers],
                                         attention_mask, self.groups)
            self.keys = [k.new_empty(rows, k.shape[1], self.max_new_tokens, k.shape[3]) for k in self.shared.keys]
            self.values = [v.new_empty(rows, v.shape[1], self.max_new_tokens, v.shape[3]) for v in self.shared.values]
            self.length = 0
            return out.logits[:, -1]
        capacity = width + self.max_new_tokens
        self.keys, self.values = [], []
        for layer in layers:
            for store, filled in ((self.keys, layer.keys), (self.values, layer.values)):
                buffer = filled.new_empty(rows, filled.shape[1], capacity, filled.shape[3])
                buffer[:, :, :width] = filled
                store.append(buffer)
        # Additive key mask, 0 where a row may attend: what SDPA makes of a boolean mask inside every
        # call (0 / -inf in the query dtype), built once here; eager uses dtype min as transformers does.
        dtype = self.keys[0].dtype
        hidden_fill = torch.finfo(dtype).min if self.eager else float("-inf")
        self.bias = torch.full((rows, capacity), hidden_fill, dtype=dtype, device=input_ids.device)
        self.bias[:, :width].masked_fill_(attention_mask.bool(), 0.0)
        self.length = width
        self._update_padding()
        return out.logits[:, -1]

    def kv_bytes(self) -> int:
        """Bytes held by this call's K/V buffers (rows' buffers plus, when shared, the prompts' part)."""
        tensors = [*self.keys, *self.values]
        if self.shared is not None:
            tensors += [*self.shared.keys, *self.shared.values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def repeat_interleave(self, n: int) -> None:
        """Fan each prompt's state out to ``n`` rows; only the filled columns are copied."""
        if n == 1:
            return
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                rows, heads, capacity, dim = buffer.shape
                fanned = buffer.new_empty(rows * n, heads, capacity, dim)
                fanned.view(rows, n, heads, capacity, dim)[:, :, :, : self.length] = buffer[:, None, :, : self.length]
                store[i] = fanned
        self.positions = self.positions.repeat_interleave(n, dim=0)
        self.rows *= n
        if self.shared is not None:
            self.shared.fan_out(n)
        else:
            self.bias = self.bias.repeat_interleave(n, dim=0)

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep``: move them to the front of the buffers (filled columns only)."""
        count = keep.numel()
        for buffer in (*self.keys, *self.values):
            buffer[:count, :, : self.length] = buffer[keep, :, : self.length]
        self.positions = self.positions[keep]
        self.rows = count
        if self.shared is not None:
            self.shared.select(keep)
        else:
            self.bias[:count] = self.bias[keep]
            self._update_padding()

    def _update_padding(self) -> None:
        # transformers drops the SDPA mask when no live row has padding; mirror it (other kernel path).
        self.padded = bool((self.bias[: self.rows, : self.length] != 0).any())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next-token logits ``[B, V]``."""
        rows, column = self.rows, self.length
        self.length = length = column + 1
        self.positions = self.positions + 1
        shared = self.shared
        key_mask = None
        if shared is None:
            self.bias[:rows, column] = 0.0
            key_mask = self.bias[:rows, None, None, :length] if self.padded or self.eager else None

        hidden = self.embed(tokens[:, None])
        # RoPE as transformers writes it, q*cos + rotate_half(q)*sin with rotate_half(q) = (-q2, q1),
        # in fewer ops: roll(q) = (q2, q1) and the sign moved onto sin (bitwise equal: x*-y == -x*y).
        if self.rotary is not None:
            rotary = self.rotary.index_select(0, self.positions)  # [B, 2, head_dim]
            cos, sin = rotary[:, :1], rotary[:, 1:]
        else:
            cos, sin = self.rotary_emb(hidden, self.positions[:, None])  # [B, 1, head_dim]
            sin = sin * self.sin_sign
        half = self.half
        heads = (rows, -1, self.head_dim)  # one token per row: [B, 1, H*D] -> [B, H, D] is a view
        for index, (layer, key_buffer, value_buffer) in enumerate(zip(self.layers, self.keys, self.values)):
            input_norm, q_proj, k_proj, v_proj, o_proj, scaling, post_norm, mlp = layer
            residual = hidden
            hidden = input_norm(hidden)
            query = q_proj(hidden).view(heads)
            key = k_proj(hidden).view(heads)
            query = query * cos + query.roll(half, -1) * sin
            torch.add(key * cos, key.roll(half, -1) * sin, out=key_buffer[:rows, :, column])
            value_buffer[:rows, :, column] = v_proj(hidden).view(heads)
            keys, values = key_buffer[:rows, :, :length], value_buffer[:rows, :, :length]
            if shared is None:
                out = self._attend(query, keys, values, key_mask, scaling)
            else:
                out = shared.attend(index, query, keys, values, scaling)
            hidden = residual + o_proj(out)
            residual = hidden
            hidden = residual + mlp(post_norm(hidden))
        return self.lm_head(self.norm(hidden))[:, -1]

    def _attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Query ``[B, H, D]`` against the cached keys -> ``[B, 1, H * D]``, as transformers computes it."""
        rows, heads = query.shape[0], query.shape[1]
        if self.eager:
            if self.groups > 1:
                keys = keys.repeat_interleave(self.groups, dim=1)
                values = values.repeat_interleave(self.groups, dim=1)
            weights = torch.matmul(query[:, :, None], keys.transpose(2, 3)) * scaling + key_mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(weights, values)
        elif self.groups == 1:
            out = F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=key_mask, scale=scaling)
        elif key_mask is None:
            out = F.scaled_dot_product_attention(query[:, :, None], keys, values, scale=scaling, enable_gqa=True)
        else:
            # pack_gqa: a key/value head's query heads become its query rows; one mask serves them all.
            packed = query.view(rows, heads // self.groups, self.groups, self.head_dim)
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=key_mask, scale=scaling)
        return out.reshape(rows, 1, heads * self.head_dim)
