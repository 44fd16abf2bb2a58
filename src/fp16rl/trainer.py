"""The RL loop: sample -> reward -> advantages -> pi_old + mismatch -> loss -> (scaled) step -> sync.

Readable top to bottom on purpose (nanoGPT style): ``Trainer.step`` is one GRPO step as drawn in
DESIGN.md; set-up, checkpoints and logging are around it.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import get_scheduler

import fp16rl
from fp16rl.algorithms import Correction, LossSettings, group_advantages, policy_loss
from fp16rl.atomic import atomic_write_text
from fp16rl.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from fp16rl.config import ConfigError, TrainConfig
from fp16rl.logprobs import TokenBatch, build_token_batch, completion_logprobs
from fp16rl.mismatch import mismatch_metrics
from fp16rl.monitor import CollapseEvent, CollapseMonitor
from fp16rl.models import (LoraSettings, apply_lora, load_model, load_tokenizer, require_4bit_support, resolve_device,
                           resolve_model_path, stop_token_ids, tiny_model_path)
from fp16rl.precision import DtypeRecorder, PrecisionPolicy, check_observed
from fp16rl.sampler import Rollouts, Sampler, SamplingParams, cast_parameters
from fp16rl.tasks import make_task
from fp16rl.tasks.base import PromptItem, Scores, Task
from fp16rl.tracking import ProgressDisplay, RunTracker, best_reward, final_reward, read_metrics


def prepare_run_dir(config: TrainConfig) -> tuple[Path, Path | None]:
    """The run folder and, when resuming, the checkpoint to resume from. Never overwrites a run."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output-dir {run_dir} exists and is not a folder")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        checkpoints = checkpoint_dirs(run_dir)
        if not checkpoints:
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume from")
        return run_dir, checkpoints[-1]
    if occupied:
        raise ConfigError(
            f"--output-dir {run_dir} is in use (not empty); pass --resume to continue that run or choose another folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: the same in every arm of a comparison (paired randomness)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def unique_ngram_ratio(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a completion; falls as text starts looping (a collapse signal)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


class Trainer:
    """Owns the models, the sampler, the optimizer and the run folder of one training run."""

    def __init__(self, config: TrainConfig, task: Task | None = None):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        if config.load_in_4bit:
            require_4bit_support(self.device)  # before the run folder exists: nothing written on refusal
        self.run_dir, resume_from = prepare_run_dir(config)
        self.policy = PrecisionPolicy.from_options(
            config.dtype, config.sampler_dtype, config.trainer_dtype, config.loss_scale_growth_interval
        )
        if self.device.type == "cuda" and config.gpu_memory_utilization < 1.0:
            torch.cuda.set_per_process_memory_fraction(config.gpu_memory_utilization, self.device)
        seed_everything(config.seed)

        model_path = tiny_model_path() if config.model_path == "tiny" else resolve_model_path(config.model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.task = task or make_task(config, self.tokenizer)  # before the model: bad data fails fast
        self.model = self._load_trainer_model(model_path)
        self.reference = self._make_reference() if config.beta != 0.0 else None
        eos_ids = stop_token_ids(self.model, self.tokenizer)
        self.sampler = Sampler(self.model, self.policy.sampler_dtype, self.tokenizer.pad_token_id, eos_ids,
                               engine=config.sampler_engine)
        self.sampling = SamplingParams(
            max_new_tokens=config.max_completion_length,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            repetition_penalty=config.repetition_penalty,
        )
        self.loss_settings = LossSettings(
            loss_type=config.loss_type,
            importance_sampling_level=config.importance_sampling_level,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            max_completion_length=config.max_completion_length,
        )
        self.correction = Correction(config.is_correction, config.is_clip_max, config.is_clip_min)
        self.total_steps = self._total_steps()

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.scaler = self.policy.grad_scaler(self.device.type)
        self.start_step = 0
        self.skipped_steps_total = 0
        self.precision_report: dict[str, Any] | None = None
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, self.scaler)
            self.start_step = state["step"]
            self.skipped_steps_total = state["skipped_steps_total"]
            self.precision_report = state.get("precision")
            self.sampler.sync_from(self.model)
        self.tracker = RunTracker(self.run_dir, resume_step=self.start_step if resume_from else None)
        self.monitor = CollapseMonitor()
        for record in read_metrics(self.run_dir / "metrics.jsonl"):  # resume: rebuild the monitor's state
            self.monitor.update(record["step"], record)
        self._write_config()

    # --- set-up --------------------------------------------------------------------------------

    def _load_trainer_model(self, model_path: Path) -> torch.nn.Module:
        """FP32 master weights for what is trained; LoRA's frozen base is stored in the trainer dtype.

        With ``--load-in-4bit`` the base's linear layers are NF4 computing in the trainer dtype and
        everything else frozen stays in that dtype too. Unlike peft's ``prepare_model_for_kbit_training``
        the norms and lm_head are not upcast to fp32: the sampler must compute what the trainer computes.
        """
        load_dtype = self.policy.trainer_dtype if self.config.load_in_4bit else torch.float32
        model = load_model(model_path, load_dtype, self.config.attn_implementation, self.device,
                           load_in_4bit=self.config.load_in_4bit)
        if self.config.lora_r == 0:
            model.requires_grad_(True)
            return model
        lora = LoraSettings(r=self.config.lora_r, alpha=self.config.lora_alpha, use_rslora=self.config.use_rslora,
                            target_modules=tuple(self.config.lora_target_modules))
        model = apply_lora(model, lora)
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(self.policy.trainer_dtype)
        return model

    def _make_reference(self) -> torch.nn.Module | None:
        """Full fine-tuning keeps a frozen copy; LoRA uses the base model with adapters disabled."""
        if self.config.lora_r > 0:
            return None
        reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        cast_parameters(reference, self.policy.trainer_dtype)
        return reference

    def _total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        per_epoch = self.task.num_steps_per_epoch
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _write_config(self) -> None:
        import peft
        import transformers

        document = {
            "config": self.config.to_dict(),
            "task": self.task.name,
            "total_steps": self.total_steps,
            "device": str(self.device),
            "precision": self.precision_report or {"declared": self.policy.describe(), "observed": "after step 1"},
            "versions": {
                "fp16rl": fp16rl.__version__,
                "torch": str(torch.__version__),
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "python": platform.python_version(),
            },
        }
        if self.config.load_in_4bit:
            import bitsandbytes

            document["versions"]["bitsandbytes"] = bitsandbytes.__version__
        if hasattr(self.task, "describe"):
            document["task_details"] = self.task.describe()
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))

    # --- the loop ------------------------------------------------------------------------------

    def train(self, show_progress: bool = True) -> dict[str, Any]:
        """Run until ``total_steps`` (or a collapse with ``stop_on_collapse``); returns the last metrics."""
        metrics: dict[str, Any] = {}
        status = "failed"
        display = ProgressDisplay(self.total_steps, self.start_step) if show_progress else nullcontext()
        try:
            with display:
                for step in range(self.start_step + 1, self.total_steps + 1):
                    metrics = self.step(step)
                    self.tracker.log(step, metrics)
                    if show_progress:
                        display.update(step, metrics)
                    event = self.monitor.update(step, metrics)
                    if event is not None:
                        self._announce(event, show_progress)
                    if event is not None and self.config.stop_on_collapse:
                        self.save(step)
                        status = "stopped_on_collapse"
                        break
                    if step % self.config.save_steps == 0 or step == self.total_steps:
                        self.save(step)
                else:
                    status = "finished"
        finally:
            self.tracker.close()
            self.task.close()
            self._write_summary(status)
        return metrics

    def _announce(self, event: CollapseEvent, show_progress: bool) -> None:
        if show_progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold yellow]collapse detected[/] at step {event.step}: "
                                       f"{event.rule} ({event.detail})")

    def _write_summary(self, status: str) -> None:
        """summary.json: the run's outcome at a glance (what `fp16rl compare` and `report` read)."""
        atomic_write_text(self.run_dir / "summary.json", json.dumps(
            summarize_run(read_metrics(self.run_dir / "metrics.jsonl"), self.monitor.event, status=status,
                          total_steps=self.total_steps, arm=self.config.arm, seed=self.config.seed), indent=2))

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step (1-based ``step``); returns its metrics."""
        cfg, t0 = self.config, time.perf_counter()

        # 1. Rollouts from the sampler, in the sampler dtype, with their token logprobs mu.
        items = self.task.batch(step - 1, cfg.prompts_per_step)
        prompt_ids = [self.tokenizer(item.text, add_special_tokens=False)["input_ids"] for item in items]
        rollouts = self.sampler.generate(prompt_ids, cfg.num_generations, self.sampling, seed=step_seed(cfg.seed, step))
        token_lists = rollouts.completion_lists()
        completions = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        t_rollout = time.perf_counter()

        # 2. Rewards and group advantages.
        grouped_items = [item for item in items for _ in range(cfg.num_generations)]
        scores = self.task.score(grouped_items, completions, rollouts.truncated)
        rewards = torch.tensor(scores.rewards, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        t_reward = time.perf_counter()

        # 3. The trainer's logprobs at the rollout parameters (pi_old), the mismatch, the reference.
        batch = build_token_batch(rollouts.prompt_ids, cfg.num_generations, rollouts.completion_ids,
                                  rollouts.completion_mask, self.tokenizer.pad_token_id).to(self.device)
        recorder = DtypeRecorder()
        with torch.no_grad(), recorder.watch(self.model):
            old_logprobs, entropy = self._logprobs(self.model, batch, with_entropy=True)
        ref_logprobs = self._reference_logprobs(batch) if self.loss_settings.beta != 0.0 else None
        if self.precision_report is None:
            self.precision_report = check_observed(self.policy, rollouts.observed_dtype, recorder.report())
            self._write_config()
        mu = rollouts.sampler_logprobs.to(self.device)
        token_mask = batch.completion_mask
        metrics = mismatch_metrics(mu, old_logprobs, token_mask)
        is_weights, metrics["mismatch/is_masked_ratio"] = self.correction.weights(old_logprobs, mu, token_mask)

        # 4. Loss, backward (scaled in fp16), unscale, clip, step or skip; then sync the sampler.
        loss_mask = token_mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask[torch.tensor(rollouts.truncated, device=self.device)] = False
        optim_metrics = self._optimize(batch, loss_mask, advantages.to(self.device), old_logprobs, is_weights,
                                       ref_logprobs)
        self.sampler.sync_from(self.model)
        t_train = time.perf_counter()

        # 5. Metrics.
        lengths = rollouts.completion_mask.sum(dim=1).float()
        num_tokens = float(lengths.sum())
        metrics.update({
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "reward/min": rewards.min().item(),
            "reward/max": rewards.max().item(),
            **{f"reward/{name}/mean": float(np.mean(values)) for name, values in scores.components.items()},
            **scores.metrics,
            "completion/length_mean": lengths.mean().item(),
            "completion/length_max": lengths.max().item(),
            "completion/truncated_ratio": float(np.mean(rollouts.truncated)),
            "completion/unique_ngram_ratio_4": float(np.mean([unique_ngram_ratio(t) for t in token_lists])),
            "policy/entropy": (entropy * token_mask).sum().item() / max(num_tokens, 1.0),
            **optim_metrics,
            "time/rollout_s": t_rollout - t0,
            "time/reward_s": t_reward - t_rollout,
            "time/train_s": t_train - t_reward,
            "time/step_s": time.perf_counter() - t0,
            "throughput/rollout_tokens_per_s": num_tokens / max(t_rollout - t0, 1e-9),
            "throughput/train_tokens_per_s": num_tokens * cfg.num_iterations / max(t_train - t_reward, 1e-9),
        })
        if step % cfg.logging_steps == 0 or step == 1:
            self.tracker.log_samples(step, self._samples(grouped_items, completions, rollouts, scores))
        return metrics

    def _logprobs(self, model: torch.nn.Module, batch: TokenBatch, with_entropy: bool = False):
        """Trainer-side logprobs of a whole batch, in micro-batches, under the trainer's autocast."""
        parts, entropies = [], []
        size = self._micro_batch_size()
        with self.policy.autocast(self.device.type):
            for begin in range(0, batch.input_ids.shape[0], size):
                logp, ent = completion_logprobs(model, batch.select(slice(begin, begin + size)), self.config.temperature,
                                                with_entropy, self.config.logprob_chunk_tokens)
                parts.append(logp)
                entropies.append(ent)
        return torch.cat(parts), (torch.cat(entropies) if with_entropy else None)

    @torch.no_grad()
    def _reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        if self.reference is not None:
            return self._logprobs(self.reference, batch)[0]
        with self.model.disable_adapter():
            return self._logprobs(self.model, batch)[0]

    def _micro_batch_size(self) -> int:
        return self.config.prompts_per_step * self.config.num_generations // self.config.gradient_accumulation_steps

    def _optimize(
        self,
        batch: TokenBatch,
        loss_mask: torch.Tensor,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor,
        is_weights: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
    ) -> dict[str, float]:
        """``num_iterations`` optimizer steps over the generation batch, each over GA micro-batches."""
        cfg = self.config
        size, accum = self._micro_batch_size(), cfg.gradient_accumulation_steps
        batch_tokens = int(loss_mask.sum())
        params = [p for p in self.model.parameters() if p.requires_grad]
        totals: dict[str, float] = {"loss": 0.0, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0, "kl_ref": 0.0}
        skipped, grad_norm = 0, 0.0
        for _ in range(cfg.num_iterations):
            for begin in range(0, batch.input_ids.shape[0], size):
                rows = slice(begin, begin + size)
                with self.policy.autocast(self.device.type):
                    logprobs, _ = completion_logprobs(self.model, batch.select(rows), cfg.temperature,
                                                      chunk_tokens=cfg.logprob_chunk_tokens)
                # With one iteration pi_old is pi_theta itself (ratio exactly 1, as in TRL).
                old = logprobs.detach() if cfg.num_iterations == 1 else old_logprobs[rows]
                loss, stats = policy_loss(
                    logprobs, old, advantages[rows], loss_mask[rows], self.loss_settings, is_weights[rows],
                    ref_logprobs[rows] if ref_logprobs is not None else None, accum, batch_tokens,
                )
                self.scaler.scale(loss).backward()
                totals["loss"] += loss.item()
                for key, value in stats.items():
                    totals[key] += value.item() / accum
            step_skipped, grad_norm = self._optimizer_step(params)
            skipped += step_skipped
        self.skipped_steps_total += skipped
        iters = cfg.num_iterations
        metrics = {
            "optim/loss": totals["loss"] / iters,
            "optim/grad_norm": grad_norm,
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
            "optim/step_skipped": float(skipped),
            "optim/skipped_steps_total": float(self.skipped_steps_total),
            "policy/clip_ratio_low": totals["clip_ratio_low"] / iters,
            "policy/clip_ratio_high": totals["clip_ratio_high"] / iters,
        }
        if ref_logprobs is not None:
            metrics["policy/kl_ref"] = totals["kl_ref"] / iters
        return metrics

    def _optimizer_step(self, params: list[torch.nn.Parameter]) -> tuple[int, float]:
        """Unscale, clip, step. A step whose gradients overflowed is skipped: weights never go NaN.

        In fp16 the GradScaler finds inf/NaN, skips and lowers the scale; in bf16/fp32 a non-finite
        gradient norm skips the step the same way.
        """
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = int(self.scaler.get_scale() < scale_before)
        elif math.isfinite(grad_norm):
            self.optimizer.step()
            skipped = 0
        else:
            skipped = 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule follows steps, skipped ones included (as in HF Trainer)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        return skipped, grad_norm

    # --- outputs -------------------------------------------------------------------------------

    def _samples(self, items: list[PromptItem], completions: list[str], rollouts: Rollouts, scores: Scores) -> list[dict]:
        """The first prompt's whole group: enough to read what the model writes and how it scored."""
        group = range(min(self.config.num_generations, len(completions)))
        return [
            {
                "uid": items[i].uid,
                "prompt": items[i].text,
                "completion": completions[i],
                "reward": scores.rewards[i],
                "finish_reason": rollouts.finish_reasons[i],
                **({"details": scores.details[i]} if scores.details else {}),
            }
            for i in group
        ]

    def save(self, step: int) -> Path:
        state = {"skipped_steps_total": self.skipped_steps_total, "data_position": step, "precision": self.precision_report}
        return save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler, self.scaler, state)


def summarize_run(
    records: list[dict[str, Any]], event: CollapseEvent | None, *, status: str, total_steps: int,
    arm: str | None, seed: int,
) -> dict[str, Any]:
    """Final reward (mean over the last 10% of steps), best 10-step moving average, collapse, speed."""
    rewards = np.array([float(r["reward/mean"]) for r in records if "reward/mean" in r])
    wall = sum(float(r.get("time/step_s", 0.0)) for r in records)
    return {
        "status": status,
        "steps_completed": records[-1]["step"] if records else 0,
        "total_steps": total_steps,
        "final_reward": final_reward(rewards),
        "best_reward": best_reward(rewards),
        "collapse_step": event.step if event else None,
        "collapse_rule": event.rule if event else None,
        "collapse_detail": event.detail if event else None,
        "steps_per_s": len(records) / wall if wall > 0 else None,
        "wall_s": wall,
        "arm": arm,
        "seed": seed,
    }
