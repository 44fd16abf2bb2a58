"""What a rank builds before its first step: the policy model with its FP32 masters and lm_head, the
reference, the sampler (``build_learner``), and the optimizer with its LR schedule (``build_optimizer``).

The order is the one the numbers depend on: the algorithm's FP32 copies (PPO's critic backbone) before
``MasterWeights`` casts the compute copy, the sampler from the masters, and the algorithm's extra models
(``Algorithm.attach``, the trainer calls it next) after the sampler copied the policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.core.errors import ConfigError
from fp16rl.learner import prompt_forward
from fp16rl.learner.critic import Critic
from fp16rl.learner.logprobs import LogitHead
from fp16rl.learner.reference import ReferencePolicy
from fp16rl.learner.weights import MasterWeights, make_optimizer, make_scheduler
from fp16rl.model.forward import backbone, length_dependent_rope
from fp16rl.model.loading import LoraSettings, enable_gradient_checkpointing, load_trainer_model, stop_token_ids
from fp16rl.model.precision import PrecisionPolicy
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.training.algorithm import Algorithm

logger = logging.getLogger("fp16rl")


@dataclass
class Learner:
    """The models of one rank, as ``build_learner`` made them."""

    model: torch.nn.Module  # the policy in the trainer dtype (peft with LoRA)
    gradient_checkpointing: bool
    weights: MasterWeights  # its FP32 masters
    head: LogitHead
    share_prompts: bool  # the trainer computes each prompt once for its completions (``prompt_forward``)
    rope_note: str | None  # a length-dependent RoPE scaling, part of the mismatch
    reference: ReferencePolicy | None
    sampler: Sampler


def lora_settings(config: TrainConfig) -> LoraSettings | None:
    """The adapters ``--lora-*`` ask for; None in full fine-tuning (``--lora-r 0``)."""
    if config.lora_r == 0:
        return None
    return LoraSettings(r=config.lora_r, alpha=config.lora_alpha, use_rslora=config.use_rslora,
                        target_modules=tuple(config.lora_target_modules))


def build_learner(config: TrainConfig, model_path: Path, tokenizer: Any, policy: PrecisionPolicy,
                  device: torch.device, sharded: bool, algorithm: Algorithm) -> Learner:
    """Load the policy, cast it (``MasterWeights``), verify its head, build the reference the algorithm
    uses and the sampler, synced from the masters (an ablation's sampler starts from them)."""
    lora = lora_settings(config)
    model = load_trainer_model(model_path, policy.trainer_dtype, lora, config.attn_implementation, device,
                               config.load_in_4bit, policy.fp32_modules)
    gradient_checkpointing = enable_gradient_checkpointing(model, config.gradient_checkpointing)
    algorithm.before_cast(model, adapters=lora is not None)
    weights = MasterWeights(model, policy, sharded=sharded)
    head = LogitHead.of(model)
    head.verify(model, lambda: policy.autocast(device.type))
    share_prompts = config.share_prompt_forward and prompts_can_be_shared(model, policy, device)
    rope_note = length_dependent_rope(backbone(model).config)
    reference = ReferencePolicy(model, adapters=lora is not None, dtype=policy.weights_dtype if sharded else None
                                ) if algorithm.uses_reference else None
    try:
        sampler = Sampler(model, policy.sampler_dtype, tokenizer.pad_token_id, stop_token_ids(model, tokenizer),
                          engine=config.sampler_engine, share_prompt_kv=config.share_prompt_kv)
    except ValueError as err:  # an engine or mode this model cannot run: one error line
        raise ConfigError(f"--sampler-engine / --share-prompt-kv: {err}") from None
    sampler.sync_from(weights.named_masters())
    return Learner(model, gradient_checkpointing, weights, head, share_prompts, rope_note, reference, sampler)


def prompts_can_be_shared(model: torch.nn.Module, policy: PrecisionPolicy, device: torch.device) -> bool:
    """Whether this model's forward takes a shared prompt (``prompt_forward.check``); logged when not.
    With FSDP the FSDP wrapper runs it without length buckets (``completion_hidden``'s ``uniform``)."""
    reason = prompt_forward.check(backbone(model), lambda: policy.autocast(device.type))
    if reason is not None:
        logger.info(f"the trainer computes each prompt once per completion (--share-prompt-forward): {reason}")
    return reason is None


def sampling_params(config: TrainConfig) -> SamplingParams:
    """How the sampler draws completions in a run."""
    return SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                          top_p=config.top_p, top_k=config.top_k, repetition_penalty=config.repetition_penalty)


def build_optimizer(config: TrainConfig, weights: MasterWeights, model: torch.nn.Module, critic: Critic | None,
                    optimizer_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the policy's masters (and the critic's, in the same steps) and its LR schedule over
    ``optimizer_steps`` (RL steps x passes)."""
    optimizer = make_optimizer(weights, model, config.learning_rate, config.weight_decay,
                               (critic.weights, critic.module) if critic is not None else None)
    scheduler = make_scheduler(optimizer, config.lr_scheduler_type, optimizer_steps, config.warmup_ratio)
    return optimizer, scheduler
