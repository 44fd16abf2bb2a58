"""fp32 islands: chosen modules of a half-precision model keep FP32 weights and compute in FP32, in both engines.

Why: the fp16 range check (``fp16rl probe``) flags layers whose activations come near 65504, and the
norms and the output head are where mixed-precision recipes usually keep FP32. An island is a set of
*compute units*, the modules that own parameters (``nn.Linear``, norms, embeddings, a peft LoRA layer as
one unit); a matched container (a decoder layer, an MLP) stands for the units inside it. Each unit::

    y = module_fp32(x.float())          weights stored in FP32, input upcast
    y = y.to(outer)                     rounded back to the engine's dtype (not for the output head:
                                        its logits stay FP32; nothing in the model reads them)

so the operations between units (attention's softmax, the gated product, residual additions) stay in
the engine's dtype. Both engines hold the same islands: the trainer's model is marked when it is built
(``model.loading.load_trainer_model``), the sampler's copy inherits marks and hooks (``copy.deepcopy``)
and casts only what is outside them (``cast_outside_islands``). The hooks are module-level functions
that read the unit's ``IslandMark``, so a copy's hooks act on the copy. A module that shares a
parameter with an island (a tied input embedding of an FP32 head) becomes part of it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator, Sequence

import torch

from fp16rl.core.errors import ModelError
from fp16rl.model.forward import causal_lm

MARK = "fp16rl_fp32_island"  # the attribute an island's unit carries (an ``IslandMark``)


@dataclass(frozen=True)
class IslandMark:
    """What an island unit is: its name (relative to the causal LM), the engine dtype its output is
    rounded back to, and whether it is (``cast_back=False``: the output head)."""

    name: str
    outer: torch.dtype
    cast_back: bool = True


def is_norm(module: torch.nn.Module) -> bool:
    """RMSNorm, LayerNorm and the architectures' own norm classes (named ``...Norm``)."""
    return "Norm" in type(module).__name__


def _is_unit(module: torch.nn.Module) -> bool:
    """A module that computes with its own parameters, or a peft LoRA layer (``base_layer`` + adapters)."""
    return next(module.parameters(recurse=False), None) is not None or hasattr(module, "base_layer")


def _units(module: torch.nn.Module, name: str) -> Iterator[str]:
    """The compute units at or below ``module`` (not descending into a unit)."""
    if _is_unit(module):
        yield name
        return
    for child_name, child in module.named_children():
        yield from _units(child, f"{name}.{child_name}" if name else child_name)


def resolve_islands(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """The compute units ``patterns`` select, by name relative to the causal LM (``model.layers.3.mlp``).

    ``norms``: every norm; ``head``: the output embedding; anything else an ``fnmatch`` pattern over
    module names (``model.layers.1[1-9]``, ``*.mlp.down_proj``, ``lm_head``). A pattern that matches no
    module is an error (one line naming examples of the names)."""
    lm = causal_lm(model)
    named = dict(lm.named_modules())
    head = lm.get_output_embeddings()
    selected: set[str] = set()
    for pattern in patterns:
        if pattern == "norms":
            matched = [n for n, m in named.items() if n and is_norm(m)]
        elif pattern == "head":
            matched = [n for n, m in named.items() if head is not None and m is head]
        else:
            matched = [n for n in named if n and fnmatchcase(n, pattern)]
        if not matched:
            examples = ", ".join(n for n in list(named)[1:4])
            raise ModelError(f"--fp32-modules {pattern}: matches no module of this model (names look like {examples})")
        for name in matched:
            selected.update(_units(named[name], name))
    selected |= _sharing(named, selected)
    # A unit inside another selected unit (``*.o_proj`` and ``*.o_proj.base_layer``) is covered by it.
    return sorted(n for n in selected if not any(n.startswith(f"{o}.") for o in selected if o != n))


def _sharing(named: dict[str, torch.nn.Module], selected: set[str]) -> set[str]:
    """Units outside ``selected`` that hold one of its parameters (tied embeddings): they must be FP32 too."""
    held = {id(p) for n in selected for p in named[n].parameters()}
    units = set(_units(named[""], ""))
    return {n for n in units - selected if any(id(p) in held for p in named[n].parameters())}


def _upcast(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(value: Any) -> Any:
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _round_back(module: torch.nn.Module, _args: tuple, output: Any) -> Any:
    mark: IslandMark = getattr(module, MARK)
    if mark.cast_back and isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(mark.outer)
    return None


def keep_in_fp32(model: torch.nn.Module, names: Sequence[str], outer: torch.dtype) -> None:
    """Make units ``names`` (``resolve_islands``) islands: FP32 parameters, input upcast, output rounded to
    ``outer`` (the output head's logits stay FP32)."""
    lm = causal_lm(model)
    named = dict(lm.named_modules())
    head = lm.get_output_embeddings()
    for name in names:
        module = named[name]
        for param in module.parameters():
            if param.is_floating_point():
                param.data = param.data.float()
        setattr(module, MARK, IslandMark(name, outer, cast_back=module is not head))
        module.register_forward_pre_hook(_upcast, with_kwargs=True)
        module.register_forward_hook(_round_back)


def island_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Name -> unit of every island of ``model`` (empty when it has none)."""
    return {getattr(m, MARK).name: m for m in model.modules() if isinstance(getattr(m, MARK, None), IslandMark)}


def island_parameter_ids(model: torch.nn.Module) -> set[int]:
    """``id`` of every parameter an island holds (to leave in FP32 when the rest is cast)."""
    return {id(p) for m in island_modules(model).values() for p in m.parameters()}


def cast_outside_islands(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters (not buffers: RoPE stays FP32) outside the islands to ``dtype``, and
    make the islands round their outputs to ``dtype`` (the sampler's copy of the trainer's model)."""
    keep = island_parameter_ids(model)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and id(param) not in keep:
            param.data = param.data.to(dtype)
    for module in island_modules(model).values():
        setattr(module, MARK, dataclasses.replace(getattr(module, MARK), outer=dtype))


def describe_islands(names: Sequence[str]) -> str:
    """A short record of the islands: names that differ only in their indices are counted under one
    pattern (``model.layers.*.input_layernorm x30, model.norm``); empty when there are none."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append(name)
    return ", ".join(members[0] if len(members) == 1 else f"{key} x{len(members)}" for key, members in groups.items())


def hidden_like(embedding: torch.nn.Module) -> torch.Tensor:
    """A tensor in the dtype and on the device of the hidden states ``embedding`` starts (what RoPE's cos/sin
    are computed in): its weight, or for an island (a tied FP32 head) an empty tensor of the dtype it
    rounds its output to."""
    weight = embedding.weight
    mark = getattr(embedding, MARK, None)
    return weight if mark is None else weight.new_empty(0, dtype=mark.outer)
