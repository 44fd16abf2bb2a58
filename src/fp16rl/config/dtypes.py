"""Precision names, without torch: the one table of dtype spellings the CLI, configs and reports accept."""

from __future__ import annotations

from fp16rl.core.errors import PrecisionError

# Spelling -> canonical name (torch's, without the ``torch.`` prefix).
DTYPE_ALIASES: dict[str, str] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
HALF_DTYPES = ("float16", "bfloat16")


def canonical_dtype(name: object) -> str:
    """``"fp16"`` / ``"float16"`` / ``torch.float16`` -> ``"float16"`` (likewise bf16, fp32)."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise PrecisionError(f"unknown dtype {name!r}; use one of float16, bfloat16, float32 (or fp16, bf16, fp32)")
    return DTYPE_ALIASES[key]
