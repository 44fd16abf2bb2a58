"""Is fp16 safe for this model at all? The largest activation per layer against the fp16 maximum.

An fp32 forward over the prompts with hooks records the largest |activation| of every decoder
layer's output (the residual stream) and of every Linear, compared with 65504: activations near it
overflow to inf in fp16 (then NaN logits).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks: the longest ``ModuleList`` (``model.layers`` in Llama, Qwen2, Mistral...)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


@torch.no_grad()
def fp16_range_check(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], headroom: float = 8.0
) -> dict[str, Any]:
    """Largest |activation| per decoder layer output and per Linear output in an fp32 forward.

    A value above 65504 becomes inf in fp16 (then NaN logits); one within ``headroom`` of it is one
    unlucky prompt away. Each prompt runs alone (no padding), so only real tokens are measured.
    """
    layer_max: dict[str, float] = {}
    linear_max: dict[str, float] = {}

    def recorder(store: dict[str, float], name: str) -> Callable:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                store[name] = max(store.get(name, 0.0), tensor.detach().abs().amax().float().item())

        return hook

    handles = [m.register_forward_hook(recorder(layer_max, name)) for name, m in decoder_layers(model)]
    handles += [m.register_forward_hook(recorder(linear_max, name))
                for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    device = next(model.parameters()).device
    try:
        for ids in prompts:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    limit = FP16_MAX / headroom
    layers = [{"name": n, "max_abs": v, "headroom": _headroom(v)} for n, v in layer_max.items()]
    modules = sorted(({"name": n, "max_abs": v, "headroom": _headroom(v)} for n, v in linear_max.items()),
                     key=lambda m: -m["max_abs"])
    flagged_layers = [entry["name"] for entry in layers if entry["max_abs"] > limit]
    flagged_modules = [entry["name"] for entry in modules if entry["max_abs"] > limit]
    worst = max([*layers, *modules], key=lambda m: m["max_abs"], default={"name": None, "max_abs": 0.0})
    return {
        "fp16_max": FP16_MAX,
        "headroom_factor": headroom,
        "limit": limit,
        "ok": not flagged_layers and not flagged_modules,
        "max_abs": worst["max_abs"],
        "max_abs_at": worst["name"],
        "flagged_layers": flagged_layers,
        "flagged_modules": flagged_modules,
        "layers": layers,
        "top_modules": modules[:5],
        "num_prompt_tokens": sum(len(p) for p in prompts),
    }


def _headroom(max_abs: float) -> float:
    """How many times the largest activation fits under the fp16 maximum (inf for an all-zero output)."""
    return FP16_MAX / max_abs if max_abs > 0 else float("inf")


def fp16_range_summary(report: dict[str, Any]) -> str:
    """One line: the largest activation, where, and whether it leaves enough headroom below 65504."""
    ratio = _headroom(report["max_abs"])
    head = f"largest |activation| {report['max_abs']:.4g} at {report['max_abs_at']} ({ratio:.3g}x below fp16 max 65504)"
    nonfinite = report.get("fp16_nonfinite_tokens")
    measured = "" if nonfinite is None else (
        "; the float16 configurations here produced no inf/NaN" if nonfinite == 0
        else f"; the float16 configurations here produced {nonfinite:.0f} inf/NaN token logprobs")
    if report["ok"]:
        return f"fp16 range OK: {head}{measured}"
    layers = report["flagged_layers"]
    modules = [m for m in report["flagged_modules"] if not any(m.startswith(layer + ".") for layer in layers)]
    where = ", ".join(compact_names(layers) + modules)
    if report["max_abs"] > FP16_MAX:
        verdict = "OVERFLOWS in fp16"
    else:
        verdict = f"less than {report['headroom_factor']:g}x headroom"
    return (f"fp16 range WARNING: {verdict} in {where}; {head}{measured}"
            "; --fp32-modules flagged keeps them in fp32 in both engines")


def compact_names(names: Sequence[str]) -> list[str]:
    """``model.layers.11``, ``model.layers.12``, ``model.layers.13`` -> ``model.layers.11-13``."""
    out: list[str] = []
    runs: list[tuple[str, int, int]] = []  # (prefix, first, last)
    for name in names:
        prefix, _, index = name.rpartition(".")
        if not index.isdigit():
            out.append(name)
            continue
        number = int(index)
        if runs and runs[-1][0] == prefix and runs[-1][2] == number - 1:
            runs[-1] = (prefix, runs[-1][1], number)
        else:
            runs.append((prefix, number, number))
    out += [f"{p}.{a}" if a == b else f"{p}.{a}-{b}" for p, a, b in runs]
    return out
