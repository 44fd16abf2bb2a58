"""TRL's option names turned into fp16rl's: the converters behind :data:`~fp16rl.config.trl_fields.TRL_FIELDS`.

:func:`translate` takes the TRL-named values a user gave (``GRPOConfig``'s fields, a TRL YAML file, ``--bf16``
on the command line), fills in TRL's defaults for the rest, refuses what fp16rl cannot do (one line each)
and returns fp16rl ``TrainConfig`` options, each with the TRL names it came from, so that a caller can tell
an option the user set (a conflict with fp16rl's own name for it is an error) from one that only follows
TRL's defaults (fp16rl's own name then wins). The batch arithmetic, with ``W`` ranks::

    completions per optimizer step = per_device_train_batch_size x W x gradient_accumulation_steps
    --prompts-per-step             = that / num_generations        (whole groups, as TRL requires)

fp16rl takes one optimizer step per generation batch (and per ``num_iterations`` pass), TRL's default
``steps_per_generation = gradient_accumulation_steps``; TRL's ``max_steps``/``save_steps``/``logging_steps``
count optimizer steps, fp16rl's RL steps of ``num_iterations`` optimizer steps each. Torch-free.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fp16rl.config.dtypes import canonical_dtype
from fp16rl.config.options import LOSS_TYPES, TrainConfig
from fp16rl.config.trl_fields import DEFAULT_ONLY, HONOURED, MAPPED, TRL_FIELDS, TrlField
from fp16rl.core.errors import ConfigError, PrecisionError

logger = logging.getLogger("fp16rl")
# Each converter returns {fp16rl field: (value, the TRL names it depends on)}.
Converted = dict[str, tuple[Any, tuple[str, ...]]]
TRL_REWARDS = ("accuracy_reward", "think_format_reward", "reasoning_accuracy_reward")
# trl grpo's registry entry for get_soft_overlong_punishment: (max_completion_len, soft_punish_cache).
TRL_OVERLONG = (1280, 256)


@dataclass
class Translation:
    """fp16rl options from TRL names. ``inputs[field]``: the TRL names given by the user that decided it
    (empty: it follows TRL's defaults). ``progress``: whether GRPOTrainer.train shows a progress bar."""

    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    progress: bool = True


def refuse(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"TRL option {name}={value!r}: {why}")


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {} or value == ()


def at_default(row: TrlField, value: Any) -> bool:
    """Whether ``value`` is TRL's default for ``row`` (None, '' and empty containers are one; a bool
    option whose default is None also takes False, except a mapped one, where None has its own meaning:
    ``bf16=None`` is bf16 unless fp16, ``bf16=False`` is not bf16)."""
    if _empty(row.default):
        return _empty(value) or (row.type is bool and value is False and row.kind != MAPPED)
    if isinstance(value, bool) or isinstance(row.default, bool):
        return value is row.default
    return value == row.default


def coerce(row: TrlField, value: Any, source: str) -> Any:
    """A value of ``row`` given as text (command line) or YAML, in the type TRL gives it."""
    if not isinstance(value, str) or row.type is str:
        if row.type is list and isinstance(value, tuple):
            return list(value)
        return value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        if row.type is bool:
            if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "yes", "1")
        if row.type is int:
            return int(text)
        if row.type is float:
            return float(text)
        if row.type is list:
            return [part.strip() for part in text.replace(",", " ").split() if part.strip()]
        if row.type is dict:
            loaded = yaml.safe_load(text)
            if not isinstance(loaded, dict):
                raise ValueError
            return loaded
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{source}: TRL option {row.name!r} expects {row.type.__name__}, got {value!r}") from None
    return value


def translate(given: Mapping[str, Any], world_size: int = 1) -> Translation:
    """fp16rl options for the TRL-named values ``given`` (the rest at TRL's defaults); a ``ConfigError``
    naming the first TRL option fp16rl cannot honour."""
    unknown = [name for name in given if name not in TRL_FIELDS]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a TRL GRPO option")
    values = {name: row.default for name, row in TRL_FIELDS.items()}
    values.update(given)
    for name, row in TRL_FIELDS.items():
        if row.kind == DEFAULT_ONLY and not at_default(row, values[name]):
            raise refuse(name, values[name], row.note)
    result = Translation(progress=not values["disable_tqdm"])
    converters = {**{name: _honoured(row) for name, row in TRL_FIELDS.items() if row.kind == HONOURED},
                  **{group: GROUPS[group] for group in {r.group for r in TRL_FIELDS.values() if r.kind == MAPPED}}}
    for convert in converters.values():
        for target, (value, depends) in convert(values, world_size).items():
            result.options[target] = value
            result.inputs[target] = tuple(name for name in depends if name in given)
    return result


def _honoured(row: TrlField) -> Callable[[dict[str, Any], int], Converted]:
    def convert(values: dict[str, Any], world_size: int) -> Converted:
        value = values[row.name]
        if value is None and row.default is None:  # not set: fp16rl's default applies
            return {}
        return {row.target: (value, (row.name,))}

    return convert


def _batch(v: dict[str, Any], world_size: int) -> Converted:
    per_device, accumulation, group = (v["per_device_train_batch_size"], v["gradient_accumulation_steps"],
                                       v["num_generations"])
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations"):
        if not isinstance(v[name], int) or isinstance(v[name], bool) or v[name] < 1:
            raise refuse(name, v[name], "must be a positive integer")
    per_step = per_device * world_size * accumulation
    if v["generation_batch_size"] is not None and v["steps_per_generation"] is not None:
        raise refuse("generation_batch_size", v["generation_batch_size"],
                     "generation_batch_size and steps_per_generation cannot both be set (as in TRL)")
    if v["steps_per_generation"] not in (None, accumulation):
        raise refuse("steps_per_generation", v["steps_per_generation"], "fp16rl takes one optimizer step per "
                     f"generation batch: it must equal gradient_accumulation_steps ({accumulation})")
    if v["generation_batch_size"] not in (None, per_step):
        raise refuse("generation_batch_size", v["generation_batch_size"], "fp16rl takes one optimizer step per "
                     f"generation batch: it must be per_device_train_batch_size x world size x "
                     f"gradient_accumulation_steps ({per_step})")
    if per_step % group:
        raise ConfigError(f"TRL options: per_device_train_batch_size x world size x gradient_accumulation_steps "
                          f"({per_device} x {world_size} x {accumulation} = {per_step}) must be divisible by "
                          f"num_generations ({group})")
    names = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
             "generation_batch_size", "steps_per_generation")
    return {"prompts_per_step": (per_step // group, names),
            "gradient_accumulation_steps": (accumulation, ("gradient_accumulation_steps",)),
            "num_generations": (group, ("num_generations",))}


def training_dtype(v: Mapping[str, Any]) -> str:
    """bf16/fp16 as TRL reads them (bf16=None is True unless fp16) -> fp16rl's one --dtype."""
    bf16 = (not v["fp16"]) if v["bf16"] is None else v["bf16"]
    if bf16 and v["fp16"]:
        raise refuse("fp16", True, "bf16 and fp16 are both True; fp16rl computes in one precision: choose one")
    return "bfloat16" if bf16 else "float16" if v["fp16"] else "float32"


def _precision(v: dict[str, Any], world_size: int) -> Converted:
    return {"dtype": (training_dtype(v), ("bf16", "fp16"))}


def check_load_dtype(name: str, value: Any, v: Mapping[str, Any]) -> None:
    """A model load dtype (ModelConfig's dtype, model_init_kwargs') is fine when fp16rl's loading matches it."""
    if value is None or str(value).removeprefix("torch.") in ("auto", "float32"):
        return
    try:
        same = canonical_dtype(str(value).removeprefix("torch.")) == canonical_dtype(training_dtype(v))
    except PrecisionError:
        same = False
    if not same:
        raise refuse(name, value, f"fp16rl loads the model in its training precision ({training_dtype(v)}, from "
                     "bf16/fp16); set bf16 or fp16 instead")


def _model_dtype(v: dict[str, Any], world_size: int) -> Converted:
    for name in ("dtype", "torch_dtype"):
        check_load_dtype(name, v[name], v)
    return {}


def _model_init(v: dict[str, Any], world_size: int) -> Converted:
    kwargs = v["model_init_kwargs"] or {}
    if not isinstance(kwargs, dict):
        raise refuse("model_init_kwargs", kwargs, "expects a dict")
    out: Converted = {}
    for key, value in kwargs.items():
        if key in ("dtype", "torch_dtype"):
            check_load_dtype(f"model_init_kwargs[{key!r}]", value, v)
        elif key == "attn_implementation":
            out["attn_implementation"] = (value, ("model_init_kwargs",))
        elif not ((key == "trust_remote_code" and value is False) or (key == "revision" and value in (None, "main"))
                  or (key == "device_map" and value in (None, "auto"))):
            raise refuse(f"model_init_kwargs[{key!r}]", value, "fp16rl loads the model itself (dtype and "
                         "attn_implementation are the keys it takes)")
    return out


def _steps(v: dict[str, Any], world_size: int) -> Converted:
    mu = v["num_iterations"]
    if not isinstance(mu, int) or isinstance(mu, bool) or mu < 1:
        raise refuse("num_iterations", mu, "must be a positive integer")
    out: Converted = {"num_iterations": (mu, ("num_iterations",))}
    if v["max_steps"] > 0:
        if v["max_steps"] % mu:
            raise refuse("max_steps", v["max_steps"], f"TRL counts optimizer steps; fp16rl's steps are "
                         f"num_iterations ({mu}) optimizer steps each: use a multiple of {mu}")
        out["max_steps"] = (v["max_steps"] // mu, ("max_steps", "num_iterations"))
    for name, target in (("save_steps", "save_steps"), ("logging_steps", "save_samples_steps")):
        if v[name] < 1:
            raise refuse(name, v[name], "a fraction of the run is not supported; give a number of steps")
        out[target] = (max(1, math.ceil(v[name] / mu)), (name, "num_iterations"))
    return out


def _warmup(v: dict[str, Any], world_size: int) -> Converted:
    steps, ratio = v["warmup_steps"], v["warmup_ratio"]
    if ratio is not None:
        if steps:
            raise refuse("warmup_ratio", ratio, "warmup_steps is set too; give one of them")
        return {"warmup_ratio": (float(ratio), ("warmup_ratio",))}
    if steps < 1:
        return {"warmup_ratio": (float(steps), ("warmup_steps",))}
    if v["max_steps"] <= 0:
        raise refuse("warmup_steps", steps, "a count of warm-up steps needs max_steps (fp16rl's warm-up is a "
                     "fraction of the run): give a fraction < 1 or set max_steps")
    return {"warmup_ratio": (min(1.0, steps / v["max_steps"]), ("warmup_steps", "max_steps"))}


def _importance_sampling(v: dict[str, Any], world_size: int) -> Converted:
    names = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
             "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap")
    if not v["vllm_importance_sampling_correction"]:
        return {"is_correction": ("none", names[:1])}
    clip_max = v["vllm_importance_sampling_cap"] if v["vllm_importance_sampling_cap"] is not None else \
        v["vllm_importance_sampling_clip_max"]
    if clip_max is None:
        raise refuse("vllm_importance_sampling_clip_max", None, "fp16rl's correction needs an upper bound "
                     "(--is-clip-max)")
    return {"is_correction": (v["vllm_importance_sampling_mode"], names[:2]),
            "is_clip_max": (float(clip_max), (names[2], names[4])),
            "is_clip_min": (float(v["vllm_importance_sampling_clip_min"] or 0.0), names[3:4]),
            "is_reference": ("behaviour", names[:1])}


def _lengths(v: dict[str, Any], world_size: int) -> Converted:
    completion, prompt = v["max_completion_length"], v["max_prompt_length"]
    if completion is None:
        raise refuse("max_completion_length", None, "fp16rl needs a bound on the completion length")
    if prompt is None:  # TRL 1.16 has no prompt limit: fp16rl's --max-seq-length default, room for the completion
        return {"max_completion_length": (completion, ("max_completion_length",)),
                "max_seq_length": (max(TrainConfig.max_seq_length, completion + 1024), ())}
    return {"max_completion_length": (completion, ("max_completion_length",)),
            "max_seq_length": (prompt + completion, ("max_prompt_length", "max_completion_length"))}


def _lora(v: dict[str, Any], world_size: int) -> Converted:
    if not v["use_peft"]:
        if v["load_in_4bit"]:
            raise refuse("load_in_4bit", True, "4-bit weights cannot be trained directly: set use_peft")
        return {"lora_r": (0, ("use_peft",))}
    if v["lora_dropout"]:
        logger.warning(f"lora_dropout={v['lora_dropout']} is not applied: fp16rl trains without dropout, so that "
                       "the trainer computes the function the sampler sampled")
    out: Converted = {"lora_r": (v["lora_r"], ("use_peft", "lora_r")), "lora_alpha": (v["lora_alpha"], ("lora_alpha",)),
                      "use_rslora": (v["use_rslora"], ("use_rslora",)),
                      "load_in_4bit": (v["load_in_4bit"], ("load_in_4bit",))}
    if v["lora_target_modules"] is not None:
        targets = v["lora_target_modules"]
        if targets == "all-linear" or targets == ["all-linear"]:
            raise refuse("lora_target_modules", targets, "name the modules (fp16rl's default: the attention and "
                         "MLP projections)")
        out["lora_target_modules"] = ([targets] if isinstance(targets, str) else list(targets),
                                      ("lora_target_modules",))
    return out


def _loss_type(v: dict[str, Any], world_size: int) -> Converted:
    if v["loss_type"] not in LOSS_TYPES:
        raise refuse("loss_type", v["loss_type"], f"not supported; fp16rl has {', '.join(LOSS_TYPES)}")
    return {"loss_type": (v["loss_type"], ("loss_type",))}


def _report_to(v: dict[str, Any], world_size: int) -> Converted:
    value = v["report_to"]
    names = [value] if isinstance(value, str) else list(value or ["none"])
    if "all" in names:
        raise refuse("report_to", value, "name the trackers: tensorboard, wandb, trackio, mlflow")
    return {"report_to": (names, ("report_to",))}


def _reward_funcs(v: dict[str, Any], world_size: int) -> Converted:
    """``trl grpo``'s rewards: the reward model folder first, then ``reward_funcs`` (TRL's registry names, dotted
    paths); its ``get_soft_overlong_punishment`` entry is ``get_soft_overlong_punishment(1280, 256)``, which is
    fp16rl's ``soft_overlong_punishment`` with those parameters (as TRL's defaults: fp16rl's own
    --overlong-* options override them)."""
    names: list[str] = []
    out: Converted = {}
    folder = v["reward_model_name_or_path"]
    if folder:
        if not (Path(folder) / "config.json").is_file():
            raise refuse("reward_model_name_or_path", folder, "not a local model folder (no config.json); fp16rl "
                         "downloads nothing: save the reward model with save_pretrained and give its folder")
        names.append(str(folder))
    given = v["reward_funcs"] or []
    for name in [given] if isinstance(given, str) else given:
        if name == "get_soft_overlong_punishment":
            name = "soft_overlong_punishment"
            out.update({"overlong_max_completion_len": (TRL_OVERLONG[0], ()),
                        "overlong_soft_punish_cache": (TRL_OVERLONG[1], ())})
        elif name in TRL_REWARDS:
            name = f"trl.rewards:{name}"
        elif ":" not in name and "." in name:
            module, _, attr = name.rpartition(".")
            name = f"{module}:{attr}"
        names.append(name)
    if names:
        out["reward_funcs"] = (names, ("reward_model_name_or_path", "reward_funcs"))
    return out


def _simple(target: str, name: str, convert: Callable[[Any], Any]) -> Callable[[dict[str, Any], int], Converted]:
    def run(v: dict[str, Any], world_size: int) -> Converted:
        value = convert(v[name])
        return {} if value is None else {target: (value, (name,))}

    return run


def _optim(value: str) -> None:
    if value not in ("adamw_torch", "adamw_torch_fused"):
        raise refuse("optim", value, "fp16rl trains with AdamW (adamw_torch, adamw_torch_fused)")


def _fsdp(value: Any) -> bool | None:
    if _empty(value) or value is False:
        return None
    words = value if isinstance(value, list) else str(value).split()
    if value is True or "full_shard" in words:
        return True
    raise refuse("fsdp", value, "fp16rl's --fsdp is full sharding (full_shard) of full fine-tuning")


def _resume(value: Any) -> bool | None:
    if _empty(value) or value is False or str(value).lower() == "false":
        return None
    if value is True or str(value).lower() == "true":
        return True
    raise refuse("resume_from_checkpoint", value, "fp16rl resumes output_dir from its latest checkpoint: pass True "
                 "(and that folder as output_dir)")


def _kl(v: dict[str, Any], world_size: int) -> Converted:
    if v["use_bias_correction_kl"] and v["beta"] > 0:
        logger.warning("use_bias_correction_kl=True is not applied: fp16rl's KL term is the plain k3 "
                       "(TRL's use_bias_correction_kl=False)")
    return {}


GROUPS: dict[str, Callable[[dict[str, Any], int], Converted]] = {
    "batch": _batch, "precision": _precision, "model_dtype": _model_dtype, "model_init": _model_init,
    "steps": _steps, "warmup": _warmup, "is": _importance_sampling, "lengths": _lengths, "lora": _lora,
    "loss_type": _loss_type, "report_to": _report_to, "reward_funcs": _reward_funcs, "kl": _kl,
    "output": _simple("output_dir", "output_dir", lambda value: "trainer_output" if value is None else value),
    "top_k": _simple("top_k", "top_k", lambda value: 0 if value is None else value),
    "reward_weights": _simple("reward_weights", "reward_weights", lambda value: [] if value is None else list(value)),
    "scale_rewards": _simple("scale_rewards", "scale_rewards",
                             lambda value: {True: "group", False: "none"}.get(value, value)),
    "optim": _simple("", "optim", _optim),
    "fsdp": _simple("fsdp", "fsdp", _fsdp),
    "resume": _simple("resume", "resume_from_checkpoint", _resume),
    "device": _simple("device", "use_cpu", lambda value: "cpu" if value else None),
    "dataset": _simple("dataset_path", "dataset_name", lambda value: value),
    "dropout": lambda v, world_size: {},
    "progress": lambda v, world_size: {},
}
