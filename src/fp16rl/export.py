"""``fp16rl export``: a run's checkpoint as a standard Hugging Face model folder (or a peft adapter).

The checkpoint holds the FP32 master weights of what was trained. Full fine-tuning: they replace the
base model's weights, cast to the dtype the base model is stored in. LoRA: ``--merge`` folds the
adapters into the base (in the base's dtype), otherwise a peft adapter folder is written (FP32
adapters, ``base_model_name_or_path`` = the base folder). Either loads with ``from_pretrained``; the
tokenizer is saved alongside. The output folder is written atomically and never overwritten.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fp16rl.atomic import atomic_directory
from fp16rl.checkpoint import checkpoint_dirs, checkpoint_problem
from fp16rl.config import ConfigError, TrainConfig, stored_run_options
from fp16rl.models import LoraSettings, apply_lora, load_model, load_tokenizer, model_folder
from fp16rl.paths import check_model_folder
from fp16rl.precision import parse_dtype
from fp16rl.runs import refuse_used_folder


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


def export_checkpoint(path: Path, output: Path, merge: bool = False) -> Path:
    """Write ``output`` (see the module docstring); return it."""
    from safetensors.torch import load_file

    run_dir, checkpoint = resolve_checkpoint(path)
    refuse_used_folder(Path(output), "--output")
    config = TrainConfig(**stored_run_options(run_dir))
    base_path = model_folder(config.model_path)
    masters = load_file(str(checkpoint / "trainable.safetensors"))
    base = load_model(base_path, torch.float32)
    stored = check_model_folder(base_path)
    stored_dtype = parse_dtype(stored.get("dtype") or stored.get("torch_dtype") or "float32")
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
    if not (config.lora_r and not merge):
        model = model.to(stored_dtype)  # the base's own dtype on disk, as it came
    with atomic_directory(output) as tmp:
        if config.lora_r and not merge:
            model.peft_config["default"].base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


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
