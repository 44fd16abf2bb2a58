"""``fp16rl export``: a run's checkpoint as a standard Hugging Face model folder (or a peft adapter).

The checkpoint holds the FP32 master weights of what was trained. Full fine-tuning: they replace the
base model's weights. LoRA: ``--merge`` folds the adapters into the base (in FP32, then cast), otherwise
a peft adapter folder is written (``base_model_name_or_path`` = the base folder). Either loads with
``from_pretrained``; the tokenizer is saved alongside. The output folder is written atomically, with
the usual file permissions, and never overwritten.

The dtype written: ``dtype`` when given; else a model (full or merged) in the run's training dtype
(``--trainer-dtype``, else ``--dtype``), the precision its weights were trained and sampled in, not the
base's storage dtype (an fp16 run of a bf16 base is written in fp16); an adapter keeps its FP32 masters.
A weight that the cast turns non-finite (beyond float16's range) is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fp16rl.core.atomic import atomic_directory
from fp16rl.runs.checkpoint import checkpoint_dirs, checkpoint_problem
from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import stored_run_options
from fp16rl.core.errors import ConfigError
from fp16rl.model.loading import LoraSettings, apply_lora, load_model, load_tokenizer, model_folder
from fp16rl.core.paths import check_model_folder
from fp16rl.model.precision import PrecisionError, dtype_name, parse_dtype
from fp16rl.runs.folders import refuse_used_folder


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from a run folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.startswith("step-"):
        run_dir, checkpoint = path.parent.parent, path
    else:
        run_dir = path
        found = checkpoint_dirs(run_dir)
        if not found:
            raise ConfigError(f"{path} is neither a run folder with checkpoints nor a checkpoints/step-N folder")
        checkpoint = found[-1]
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {checkpoint} not found")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ConfigError(f"checkpoint {checkpoint} is corrupt: {problem}")
    return run_dir, checkpoint


def export_checkpoint(path: Path, output: Path, merge: bool = False, dtype: str | None = None) -> Path:
    """Write ``output`` (see the module docstring) with its weights in ``dtype`` (float16 | bfloat16 |
    float32 and their aliases; default: see the module docstring); return it."""
    from safetensors.torch import load_file

    try:
        target = parse_dtype(dtype) if dtype is not None else None
    except PrecisionError as err:
        raise ConfigError(f"--dtype: {err}") from None
    run_dir, checkpoint = resolve_checkpoint(path)
    refuse_used_folder(Path(output), "--output")
    config = TrainConfig(**stored_run_options(run_dir))
    base_path = model_folder(config.model_path)
    masters = load_file(str(checkpoint / "trainable.safetensors"))
    check_model_folder(base_path)  # a clean error before loading
    base = load_model(base_path, torch.float32)
    tokenizer = load_tokenizer(base_path)
    with torch.no_grad():
        if config.lora_r == 0:
            _load_exactly(base, masters, checkpoint)
            model = base
        else:
            peft_model = apply_lora(base, LoraSettings(r=config.lora_r, alpha=config.lora_alpha,
                                                       use_rslora=config.use_rslora,
                                                       target_modules=tuple(config.lora_target_modules)))
            _load_exactly(peft_model, masters, checkpoint, only_trainable=True)
            model = peft_model.merge_and_unload() if merge else peft_model
    if config.lora_r and not merge:
        target = target or torch.float32
    else:
        target = target or parse_dtype(config.trainer_dtype or config.dtype)
    _cast_checked(model, target)
    with atomic_directory(output) as tmp:
        if config.lora_r and not merge:
            model.peft_config["default"].base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def _cast_checked(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model`` in place to ``dtype``, refusing a weight that the cast makes non-finite (an FP32
    or bf16 value beyond float16's +-65504)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.isfinite().all() and not tensor.to(dtype).isfinite().all():
            raise ConfigError(f"weight {name} does not fit {dtype_name(dtype)} (largest |value| "
                              f"{tensor.abs().max().item():.4g}); choose another --dtype")
    model.to(dtype)


def _load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path,
                  only_trainable: bool = False) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or not only_trainable}
    missing = sorted(set(params) - set(weights)) if only_trainable else []
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise ConfigError(f"checkpoint {source} does not match the run's model: "
                          + (f"unknown weights {unknown[:3]}" if unknown else f"missing weights {missing[:3]}"))
    for name, tensor in weights.items():
        params[name].copy_(tensor)
