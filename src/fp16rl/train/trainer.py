"""The RL loop: sample -> reward -> advantages -> pi_old + mismatch -> loss -> (scaled) step -> sync.

Readable top to bottom on purpose (nanoGPT style): ``Trainer.step`` is one GRPO step (or online DPO's:
pairs and the DPO loss, ``dpo.py``; or PPO's: the critic's values, GAE and the two clipped losses,
``ppo.py`` and ``critic.py``); set-up, checkpoints and logging are around it. The README's "One
step" section draws the same flow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from fp16rl.algo.grpo import Correction, LossSettings, policy_loss
from fp16rl.core.atomic import atomic_write_text
from fp16rl.measure.rollouts import measure_rollouts, trainer_logprobs
from fp16rl.algo.batch import RolloutBatch
from fp16rl.runs.checkpoint import prune_checkpoints, remove_torn_saves
from fp16rl.train.checkpoint_io import load_checkpoint, save_checkpoint
from fp16rl.config.options import ConfigError, TrainConfig
from fp16rl.learner.critic import Critic, copy_backbone
from fp16rl.learner.distributed import DataParallel
from fp16rl.algo.dpo import dpo_part_loss
from fp16rl.model.hardware import emulation_notes, keep_freed_memory, resolve_threads
from fp16rl.train.interrupt import RunInterrupted, StopRequest
from fp16rl.learner import prompt_forward
from fp16rl.learner.logprobs import LogitHead, completion_logprobs
from fp16rl.model.forward import TokenBatch, backbone, dropout_active, length_dependent_rope
from fp16rl.train.loss_batches import loss_batch
from fp16rl.model.loading import (LoraSettings, enable_gradient_checkpointing, load_tokenizer, load_trainer_model,
                           model_folder, require_4bit_support, resolve_device, stop_token_ids)
from fp16rl.train.monitor import CollapseEvent, CollapseMonitor
from fp16rl.measure.pi_old import FromTrainingForward, is_denominator, telemetry
from fp16rl.train.outcomes import outcome_metrics, sample_records
from fp16rl.algo.ppo import ppo_policy_loss, ppo_value_loss
from fp16rl.model.precision import PrecisionPolicy, check_observed
from fp16rl.learner.reference import ReferencePolicy
from fp16rl.runs.folders import resume_history, summarize_run
from fp16rl.train.plan import check_ranks, plan_run
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.core.seeds import step_seed
from fp16rl.train.checkpoint_io import seed_everything
from fp16rl.tasks import make_task
from fp16rl.tasks.base import Task, encode_text
from fp16rl.runs.tracking import ProgressDisplay, read_metrics
from fp16rl.train.trackers import RunTracker
from fp16rl.model.hardware import library_versions
from fp16rl.learner.fsdp import full_optimizer_state, full_tensor, shard_optimizer_state
from fp16rl.learner.weights import MasterWeights, make_optimizer, make_scheduler

logger = logging.getLogger("fp16rl")


class Trainer:
    """Owns the models, the sampler, the optimizer and the run folder of one training run."""

    def __init__(self, config: TrainConfig, task: Task | None = None, dataset: Any = None,
                 reward_funcs: Sequence[Any] | None = None):
        """``task``, or ``dataset`` (+ ``reward_funcs``), replace what ``config.dataset_path`` names (the
        Python API: ``fp16rl.train``). Under torchrun every rank builds one (``fp16rl.learner.distributed``)."""
        config.validate()
        self.config = config
        self.parallel = DataParallel.from_environment(resolve_device(config.device).type)
        check_ranks(config, self.parallel.world_size)  # every rank refuses alike
        # Refuses a bad folder, resume, model path or dataset before anything is loaded (rank 0 decides).
        plan = self.parallel.on_main(lambda: plan_run(config, check_data=task is None and dataset is None))
        failure = None
        try:
            state = self._build(plan, task, dataset, reward_funcs)
        except Exception as err:  # every rank learns of a failed set-up, so none waits in a collective
            failure = err
        self.parallel.agree(failure)
        if plan.resume_from is not None:
            self._resumed(self.parallel.broadcast(state))
        # Every rank now holds the same full weights (and optimizer state): replicate or shard them.
        self.wrapped = self.parallel.wrap(self.model, self.sharded, self.policy.weights_dtype)
        if self.sharded:
            self._shard_training_state()
        self.status = "running"
        self.saved_steps: set[int] = set()
        self.resumed_from = plan.resume_from
        self.resumes: list[dict] | None = None  # config.yaml's record of what each resume changed
        self.notes = self._notes()  # once everything loaded: a refused run prints its one error line only
        for note in self.notes if self.parallel.is_main else []:
            logger.warning(note)
        self.run_dir = plan.create() if self.parallel.is_main else plan.run_dir  # the first write
        self.tracker: RunTracker | None = None
        if self.parallel.is_main:
            remove_torn_saves(self.run_dir)
            self.tracker = RunTracker(self.run_dir, resume_step=self.start_step if plan.resume_from else None,
                                      report_to=config.report_to, config=config.to_dict())
        self.monitor = CollapseMonitor()
        history = read_metrics(self.run_dir / "metrics.jsonl") if self.parallel.is_main else None
        for record in self.parallel.broadcast(history):  # resume: rebuild the monitor's state
            self.monitor.update(record["step"], record)
        self._write_config()

    # --- set-up --------------------------------------------------------------------------------

    def _build(self, plan: Any, task: Task | None, dataset: Any, reward_funcs: Sequence[Any] | None) -> dict | None:
        """Everything a rank builds on its own: task, models, sampler, optimizer; rank 0 reads the checkpoint
        to resume from and returns what the other ranks need of it."""
        config = self.config
        self.device = self.parallel.device(resolve_device(config.device))
        self.threads_note = None
        if self.device.type == "cpu":  # resolved once per run: a resume computes with the recorded count
            threads, self.threads_note = resolve_threads(config.threads, plan.threads, self.device)
            torch.set_num_threads(threads)
            keep_freed_memory()
        if config.load_in_4bit:
            require_4bit_support(self.device)
        self.policy = PrecisionPolicy.from_options(config.dtype, config.sampler_dtype, config.trainer_dtype,
                                                   config.loss_scale_growth_interval, config.trainer_compute)
        seed_everything(config.seed)
        self.sharded = config.fsdp and self.parallel.enabled

        model_path = model_folder(config.model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.task = task or make_task(config, self.tokenizer, dataset, reward_funcs)  # before the model: fails fast
        lora = None if config.lora_r == 0 else LoraSettings(r=config.lora_r, alpha=config.lora_alpha,
                                                             use_rslora=config.use_rslora,
                                                             target_modules=tuple(config.lora_target_modules))
        self.model = load_trainer_model(model_path, self.policy.trainer_dtype, lora, config.attn_implementation,
                                        self.device, config.load_in_4bit)
        self.gradient_checkpointing = enable_gradient_checkpointing(self.model, config.gradient_checkpointing)
        ppo = config.algorithm == "ppo"
        copied = copy_backbone(self.model) if ppo and lora is None else None  # FP32, before the compute copy
        self.weights = MasterWeights(self.model, self.policy, sharded=self.sharded)
        self.head = LogitHead.of(self.model)
        self.head.verify(self.model, lambda: self.policy.autocast(self.device.type))
        self.share_prompts = config.share_prompt_forward and self._prompts_can_be_shared()
        self.rope_note = length_dependent_rope(backbone(self.model).config)
        self.dpo = config.algorithm == "online_dpo"
        self.reference = None if config.beta == 0.0 and not self.dpo else ReferencePolicy(
            self.model, adapters=lora is not None, dtype=self.policy.weights_dtype if self.sharded else None)
        try:
            self.sampler = Sampler(self.model, self.policy.sampler_dtype, self.tokenizer.pad_token_id,
                                   stop_token_ids(self.model, self.tokenizer), engine=config.sampler_engine,
                                   share_prompt_kv=config.share_prompt_kv)
        except ValueError as err:  # an engine or mode this model cannot run: one error line
            raise ConfigError(f"--sampler-engine / --share-prompt-kv: {err}") from None
        self.sampler.sync_from(self.weights.named_masters())  # an ablation's sampler starts from the FP32 masters
        self.critic = Critic(self.model, copied, self.policy, self.device) if ppo else None  # after the sampler's copy
        self.passes = config.ppo_epochs if ppo else config.num_iterations  # optimizer steps per RL step
        self.sampling = SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                       top_p=config.top_p, top_k=config.top_k,
                                       repetition_penalty=config.repetition_penalty)
        self.loss_settings = LossSettings(loss_type=config.loss_type,
                                          importance_sampling_level=config.importance_sampling_level,
                                          epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
                                          max_completion_length=config.max_completion_length)
        self.correction = Correction(config.is_correction, config.is_clip_max, config.is_clip_min)
        self.total_steps = self._total_steps()
        self.optimizer = make_optimizer(self.weights, self.model, config.learning_rate, config.weight_decay,
                                        (self.critic.weights, self.critic.module) if self.critic else None)
        self.scheduler = make_scheduler(self.optimizer, config.lr_scheduler_type, self.total_steps * self.passes,
                                        config.warmup_ratio)
        self.scaler = self.policy.grad_scaler(self.device.type, sharded=self.sharded)
        self.start_step = plan.resume_step
        self.counters = {"skipped_steps_total": 0, "empty_loss_steps_total": 0}
        self.precision_report: dict[str, Any] | None = None  # observed afresh at the first step, resumed or not
        if plan.resume_from is None or not self.parallel.is_main:
            return None
        state = load_checkpoint(plan.resume_from, self.weights.load, self.optimizer, self.scheduler, self.scaler,
                                {"critic": self.critic.weights.load} if self.critic else None)
        self._check_resumed_precision(state.get("precision"), plan.resume_from)
        if not self.parallel.enabled:
            return state
        return {"state": state, "masters": {k: v.detach().cpu() for k, v in self.weights.named_masters().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def _resumed(self, shared: dict[str, Any]) -> None:
        """Finish a resume with what rank 0 read from the checkpoint (the other ranks load it from ``shared``)."""
        if self.parallel.enabled:
            if not self.parallel.is_main:
                self.weights.load(shared["masters"], "rank 0's checkpoint")
                self.optimizer.load_state_dict(shared["optimizer"])
                self.scheduler.load_state_dict(shared["scheduler"])
                self.scaler.load_state_dict(shared["scaler"])
            shared = shared["state"]
        self.counters.update({k: shared.get(k, 0) for k in self.counters})
        self.sampler.sync_from(self.weights.named_masters())

    def _shard_training_state(self) -> None:
        """FSDP replaced the model's parameters by FP32 shards: rebuild the masters' view, the optimizer
        and the schedule over them, carrying their state (a resume's) over, split as the parameters are."""
        cfg = self.config
        optimizer_state, schedule_state = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.weights = MasterWeights(self.model, self.policy, sharded=True)
        self.optimizer = make_optimizer(self.weights, self.model, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler_type, self.total_steps * self.passes,
                                        cfg.warmup_ratio)
        in_groups = [p for group in self.optimizer.param_groups for p in group["params"]]  # the state's numbering
        self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, in_groups))
        self.scheduler.load_state_dict(schedule_state)

    # --- set-up --------------------------------------------------------------------------------

    def _notes(self) -> list[str]:
        """Warnings a user should read before the run: settings that work against each other, slow dtypes."""
        notes = emulation_notes({self.policy.sampler_dtype, self.policy.trainer_dtype}, self.device)
        if self.config.importance_sampling_level == "sequence" and self.config.loss_type != "grpo":
            notes.append(f"--importance-sampling-level sequence with --loss-type {self.config.loss_type} weights each "
                         "sequence by its length instead of optimising GSPO's per-sequence objective; GSPO uses "
                         "--loss-type grpo")
        if self.dpo and self.config.is_correction != "none":
            notes.append(f"--is-correction {self.config.is_correction} is ignored by --algorithm online_dpo "
                         "(mismatch/is_masked_ratio still reports what it would mask)")
        if self.config.fsdp and not self.parallel.enabled:
            notes.append("--fsdp shards over the ranks of a torchrun launch; in one process it changes nothing")
        if self.threads_note is not None:
            notes.append(self.threads_note)
        if self.rope_note is not None:
            notes.append(f"the mismatch includes a RoPE-scaling difference, not only precision: {self.rope_note}, "
                         "and the sampler's cached decoding takes them from the positions decoded so far, the "
                         "trainer's forward from the whole sequence, so mismatch/* is not zero even in float32 "
                         "(summary.json: mismatch_includes_rope_scaling)")
        return notes

    def _prompts_can_be_shared(self) -> bool:
        """Whether this model's forward takes a shared prompt (``prompt_forward.check``); logged when not.
        With FSDP the FSDP wrapper runs it without length buckets (``completion_hidden``'s ``uniform``)."""
        reason = prompt_forward.check(backbone(self.model), lambda: self.policy.autocast(self.device.type))
        if reason is not None:
            logger.info(f"the trainer computes each prompt once per completion (--share-prompt-forward): {reason}")
        return reason is None

    def _check_resumed_precision(self, stored: dict[str, Any] | None, checkpoint: Any) -> None:
        declared = (stored or {}).get("declared") or {}
        now = self.policy.describe()
        for key, value in declared.items():
            if key in now and now[key] != value:
                raise ConfigError(f"checkpoint {checkpoint} was written with {key}={value}, this run has {key}="
                                  f"{now[key]}; a run keeps its precision (start a new run to change it)")

    def _total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        return max(1, math.ceil(self.config.epochs * self.task.num_steps_per_epoch))

    def _write_config(self) -> None:
        if not self.parallel.is_main:
            return
        document = {
            "config": self.config.to_dict(),
            "task": self.task.name,
            "total_steps": self.total_steps,
            "device": str(self.device),
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "precision": self.precision_report or {"declared": self.policy.describe(), "observed": "after step 1"},
            "notes": self.notes,
            "versions": library_versions(),
        }
        if hasattr(self.task, "describe"):
            document["task_details"] = self.task.describe()
        if self.resumed_from is not None:  # read before the first rewrite of this run, kept for the later ones
            self.resumes = self.resumes or resume_history(self.run_dir, document["config"], self.start_step)
            document["resumes"] = self.resumes
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))

    # --- the loop ------------------------------------------------------------------------------

    def train(self, show_progress: bool = True) -> dict[str, Any]:
        """Run until ``total_steps``, a collapse with ``stop_on_collapse`` or Ctrl-C; returns the last metrics.

        ``self.status`` ends as finished | stopped_on_collapse | interrupted | failed.
        """
        metrics: dict[str, Any] = {}
        self.status, last_done = "failed", self.start_step
        stop = StopRequest(agree=self.parallel.any if self.parallel.enabled else None)
        show_progress = show_progress and self.parallel.is_main
        display = ProgressDisplay(self.total_steps, self.start_step) if show_progress else contextlib.nullcontext()
        try:
            with display, stop.installed():
                for step in range(self.start_step + 1, self.total_steps + 1):
                    metrics = self.step(step, stop)
                    last_done = step
                    if self.tracker is not None:
                        self.tracker.log(step, metrics)
                    if show_progress:
                        display.step(step, metrics)
                    event = self.monitor.update(step, metrics)
                    if event is not None:
                        self._announce(event, show_progress)
                    if event is not None and self.config.stop_on_collapse:
                        self.save(step)
                        self.status = "stopped_on_collapse"
                        break
                    if step % self.config.save_steps == 0 or step == self.total_steps:
                        self.save(step)
                    stop.armed = True
                    stop.check_between_steps()  # a signal during the step's tail stops here, the step complete
                else:
                    self.status = "finished"
        except RunInterrupted:
            self.status = "interrupted"
            for weights in [self.weights] + ([self.critic.weights] if self.critic else []):
                weights.zero_grad()
            if last_done not in self.saved_steps:
                self.save(last_done)
        except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint, but say what happened
            self.status = "interrupted"
            raise
        finally:
            if self.tracker is not None:
                self.tracker.close()
            self.task.close()
            self._write_summary(self.status)
            self.wrapped = None  # DDP must not outlive the process group (DataParallel.close says why)
            self.parallel.close()
        return metrics

    def _announce(self, event: CollapseEvent, show_progress: bool) -> None:
        if show_progress:
            logger.warning(f"collapse detected at step {event.step}: {event.rule} ({event.detail})")

    def _write_summary(self, status: str) -> None:
        if not self.parallel.is_main:
            return
        atomic_write_text(self.run_dir / "summary.json", json.dumps(
            summarize_run(read_metrics(self.run_dir / "metrics.jsonl"), self.monitor.event, status=status,
                          total_steps=self.total_steps, arm=self.config.arm, seed=self.config.seed,
                          mismatch_includes_rope_scaling=self.rope_note is not None), indent=2))

    def step(self, step: int, stop: StopRequest | None = None) -> dict[str, float]:
        """One RL step (1-based ``step``) of GRPO, PPO or online DPO; returns its metrics. ``stop`` is polled at
        safe points."""
        cfg, t0 = self.config, time.perf_counter()
        stop = stop or StopRequest()

        # 1. Rollouts from the sampler (sampler dtype, their logprobs mu) and the trainer's logprobs of
        #    the same tokens at the same weights (pi_old): the measurement the probe makes too. With
        #    several ranks each samples its own prompts (slots = their places in the step's batch).
        all_items = self.task.batch(step - 1, cfg.prompts_per_step)
        slots = self.parallel.shard(len(all_items))
        items = all_items[slots.start: slots.stop]
        prompt_ids = [encode_text(self.tokenizer, i.text) for i in items]
        fused = self._pi_old_from_training()
        measured = measure_rollouts(
            self.sampler, self.model, self.head, self.policy, prompt_ids,
            cfg.num_generations, self.sampling, step_seed(cfg.seed, step), slots, self._forward_rows(),
            cfg.logprob_chunk_tokens, self.tokenizer.pad_token_id, with_entropy=True, should_stop=stop.check,
            watch=stop.watching_layers, run_backbone=self.wrapped, recompute=not fused,
            share_prompts=self.share_prompts,
            max_rows=self.sampler.rows_per_call(cfg.generation_batch_size, cfg.gpu_memory_utilization, prompt_ids,
                                                cfg.max_completion_length, cfg.num_generations))
        rollouts, tokens, old_logprobs = measured.rollouts, measured.tokens, measured.old_logprobs
        token_lists = rollouts.completion_lists()
        completions = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        if self.precision_report is None:
            self.precision_report = check_observed(self.policy, measured.observed["sampler"],
                                                   measured.observed["trainer"], full_finetune=cfg.lora_r == 0)
            self._write_config()

        # 2. Rewards; the whole batch (every rank's part) for group advantages and every metric.
        t_reward = time.perf_counter()
        grouped_items = [item for item in items for _ in range(cfg.num_generations)]
        scores = self.task.score(grouped_items, completions, rollouts.truncated, token_lists)
        mu, behaviour = rollouts.sampler_logprobs.to(self.device), rollouts.behaviour_logprobs.to(self.device)
        whole = self.parallel.whole_batch(scores, mu, behaviour, rollouts.kept_mass.to(self.device), old_logprobs,
                                          tokens.completion_mask, measured.entropy, rollouts.truncated, token_lists)
        stop.check()
        t_scored = time.perf_counter()

        # 3. The mismatch on every sampled token (whatever the algorithm), the IS weights, the tokens of the
        #    loss; GRPO: group advantages and the reference; online DPO: the pairs and their loss weights.
        #    pi_old from the training forward (``pi_old.py``): the metrics follow the loss.
        t_metrics = time.perf_counter()
        metrics, is_weights = ({}, None) if fused else telemetry(whole, self.correction, cfg.is_reference)
        mismatch_s = measured.recompute_s + time.perf_counter() - t_metrics
        loss_mask = tokens.completion_mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask[torch.tensor(rollouts.truncated, device=self.device)] = False
        batch = loss_batch(self, whole, tokens, old_logprobs, mu, is_weights, loss_mask, metrics)
        collected = FromTrainingForward(self.correction, is_denominator(cfg.is_reference, mu, behaviour),
                                        tokens.completion_mask) if fused else None

        # 4. Loss, backward (scaled in fp16), unscale, clip, step or skip; then sync the sampler.
        optim_metrics = self._optimize(batch, stop, step, collected)
        if self.dpo:  # what was backpropagated has the DPO loss's gradient, not its value
            optim_metrics["optim/loss"] = metrics["dpo/loss"]
        if collected is not None:
            t_metrics = time.perf_counter()
            whole = replace(whole, old_logprobs=self.parallel.gather_rows(collected.old),
                            entropy=self.parallel.gather_rows(collected.entropy))
            metrics.update(telemetry(whole, self.correction, cfg.is_reference)[0])
            mismatch_s = time.perf_counter() - t_metrics
        self.sampler.sync_from(self.weights.full_masters())
        t_train = time.perf_counter()

        # 5. Metrics (of the whole batch; times are this rank's).
        num_tokens = float(whole.completion_mask.sum())
        train_s = measured.recompute_s + t_train - t_scored
        metrics.update({
            **outcome_metrics(whole.scores, whole.completion_mask, whole.truncated, whole.token_lists),
            "policy/entropy": (whole.entropy * whole.completion_mask).sum().item() / max(num_tokens, 1.0),
            **optim_metrics,
            "time/rollout_s": measured.sample_s,
            "time/reward_s": t_scored - t_reward,
            "time/train_s": train_s,
            # The telemetry's cost: the metrics, and where the loss cannot give pi_old (``pi_old.py``),
            # its no-grad recompute on the sampled tokens.
            "time/mismatch_s": mismatch_s,
            "time/step_s": time.perf_counter() - t0,
            "throughput/rollout_tokens_per_s": num_tokens / max(measured.sample_s, 1e-9),
            "throughput/train_tokens_per_s": num_tokens * self.passes / max(train_s, 1e-9),
        })
        if self.tracker is not None and (step % cfg.save_samples_steps == 0 or step == 1):
            self.tracker.log_samples(step, sample_records(grouped_items, completions, rollouts.finish_reasons, scores,
                                                          cfg.num_generations))
        return metrics

    def logprobs(self, model: torch.nn.Module, tokens: TokenBatch, head: LogitHead | None = None) -> torch.Tensor:
        """Trainer-side logprobs of a whole batch (no entropy), in micro-batches and the compute context;
        ``head``: ``model``'s own (default: the policy's)."""
        return trainer_logprobs(model, tokens, self.policy, head or self.head, self.config.temperature,
                                self._forward_rows(), self.config.logprob_chunk_tokens,
                                share_prompts=self.share_prompts)[0]

    def _micro_batch_size(self) -> int:
        """Completions per gradient-accumulation micro-batch on this rank: the seed script's meaning of GA
        (the generation batch in GA parts), each rank holding its share of every part."""
        cfg = self.config
        return cfg.prompts_per_step * cfg.num_generations // cfg.gradient_accumulation_steps // self.parallel.world_size

    def _forward_rows(self) -> int:
        """Completions per trainer forward: --per-device-train-batch-size, at most the micro-batch."""
        return min(self.config.per_device_train_batch_size or self._micro_batch_size(), self._micro_batch_size())

    def _pi_old_from_training(self) -> bool:
        """Whether this step takes pi_old from the loss's forward (``pi_old.py``): GRPO with one optimizer
        pass, after the first step (whose recompute records the trainer's dtypes), without dropout."""
        return (self.passes == 1 and not self.dpo and self.critic is None and self.precision_report is not None
                and not dropout_active(self.model))

    def _optimize(self, batch: RolloutBatch, stop: StopRequest, step: int,
                  collected: FromTrainingForward | None = None) -> dict[str, float]:
        """``num_iterations`` (PPO: ``ppo_epochs``) optimizer steps over the generation batch, each over GA
        micro-batches. PPO backpropagates the policy loss, then the critic's (``critic.py`` says why).

        The loss is normalised by the counts of the whole generation batch and micro-batch (every rank's
        part: ``parallel.sum``), so the ranks' losses, and through DDP's sum their gradients, add up to
        the one-process values. ``optim/lr`` is the learning rate these optimizer steps used;
        ``optim/grad_norm`` the mean of their gradient norms (``optim/grad_norm_max`` the largest). A step
        whose loss covers no token (every completion truncated and masked) changes nothing and is counted.
        ``collected`` takes pi_old from each part's forward and gives the part its IS weights.
        """
        cfg = self.config
        size, accum = self._micro_batch_size(), cfg.gradient_accumulation_steps
        starts = range(0, batch.advantages.shape[0], size)
        micro_tokens = self.parallel.sum([batch.loss_mask[b: b + size].sum().item() for b in starts])
        batch_tokens = int(sum(micro_tokens))
        metrics = {"optim/loss_tokens": float(batch_tokens), "optim/lr": self.optimizer.param_groups[0]["lr"]}
        if batch_tokens == 0:
            self.counters["empty_loss_steps_total"] += 1
            if self.counters["empty_loss_steps_total"] == 1 and self.dpo:
                logger.warning(f"step {step}: no prompt gave a pair (every group's rewards tied, or fewer than "
                               "two untruncated completions), so the step trained on nothing (counted in "
                               "optim/empty_loss_steps_total; dpo/tied_fraction and dpo/unpaired_fraction say why)")
            elif self.counters["empty_loss_steps_total"] == 1:
                logger.warning(f"step {step}: no completion token is in the loss (all truncated and "
                               "--mask-truncated-completions is on), so the step trained on nothing; raise "
                               "--max-completion-length (counted in optim/empty_loss_steps_total)")
            if collected is not None:  # no training forward: pi_old from a recompute
                with torch.no_grad():
                    collected.fill(*trainer_logprobs(self.model, batch.tokens, self.policy, self.head, cfg.temperature,
                                                     self._forward_rows(), cfg.logprob_chunk_tokens, True,
                                                     self.wrapped, self.share_prompts))
            return {**metrics, **self._optim_summary(0.0, [], [], 0, {}, batch.ref_logprobs)}
        totals = dict.fromkeys(("loss", "clip_ratio_low", "clip_ratio_high", "kl_ref", "value_loss",
                                "value_clip_fraction"), 0.0)
        skipped, norms, rates = 0, [], []
        rows = self._forward_rows()
        total_rows = batch.advantages.shape[0]  # DDP reduces gradients in the last backward only
        backwards = sum(math.ceil(min(size, total_rows - begin) / rows) for begin in starts)
        for _ in range(self.passes):
            done = 0
            for begin, tokens in zip(starts, micro_tokens):
                micro = batch.select(slice(begin, begin + size))
                # A part of the micro-batch (several forwards, or a rank's share) is normalised as the whole.
                whole = rows >= size and not self.parallel.enabled
                group = None if whole else (size * self.parallel.world_size, int(tokens))
                for part_begin in range(0, micro.advantages.shape[0], rows):
                    part = micro.select(slice(part_begin, part_begin + rows))
                    stop.check()  # a no-op once this step has changed the weights (stop.armed is False then)
                    done += 1
                    # FSDP reduce-scatters every backward: its gradients accumulate as shards.
                    reduce = self.wrapped is None or self.sharded or done == backwards
                    with contextlib.nullcontext() if reduce else self.wrapped.no_sync():
                        with self.policy.autocast(self.device.type), stop.watching_layers(self.model):
                            logprobs, entropy = completion_logprobs(
                                self.model, part.tokens, cfg.temperature, collected is not None,
                                cfg.logprob_chunk_tokens, self.head, self.wrapped, self.share_prompts)
                        old = logprobs.detach() if self.passes == 1 else part.old_logprobs  # ratio 1, as in TRL
                        if collected is not None:
                            at = begin + part_begin
                            part = replace(part, is_weights=collected.take(
                                slice(at, at + part.advantages.shape[0]), logprobs, entropy))
                        if self.dpo:
                            loss, stats = dpo_part_loss(logprobs, part), {}
                        elif self.critic is not None:
                            loss, stats = ppo_policy_loss(logprobs, old, part, self.loss_settings, accum,
                                                          batch_tokens, group)
                        else:
                            loss, stats = policy_loss(logprobs, old, part, self.loss_settings, accum, batch_tokens,
                                                      group)
                        self.scaler.scale(loss).backward()
                        if self.critic is not None:
                            loss, stats = self._value_backward(part, accum, batch_tokens, group, loss, stats)
                    totals["loss"] += loss.item()
                    for key, value in stats.items():
                        totals[key] += value.item()
            stop.armed = False  # from here on the weights change: finish the step before stopping
            rates.append(self.optimizer.param_groups[0]["lr"])
            step_skipped, grad_norm = self._optimizer_step()
            skipped += step_skipped
            norms.append(grad_norm)
        self.counters["skipped_steps_total"] += skipped
        totals = dict(zip(totals, self.parallel.sum(list(totals.values()))))
        return {**metrics, **self._optim_summary(totals["loss"] / self.passes, norms, rates, skipped, totals,
                                                 batch.ref_logprobs)}

    def _value_backward(self, part: RolloutBatch, accum: int, batch_tokens: int, group: tuple[int, int] | None,
                        policy_loss_value: torch.Tensor, stats: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO: the critic's forward and the backward of ``vf_coef *`` its clipped value loss (``ppo.py``),
        under the critic's adapter; returns the summed loss's value and both losses' statistics."""
        cfg = self.config
        with self.critic.active():
            with self.policy.autocast(self.device.type):
                values = self.critic.module(part.tokens)
            value_loss, value_stats = ppo_value_loss(values, part, cfg.cliprange_value, cfg.vf_coef, accum,
                                                     batch_tokens, group)
            self.scaler.scale(value_loss).backward()
        return policy_loss_value.detach() + value_loss.detach(), {**stats, **value_stats}

    def _optim_summary(self, loss: float, norms: list[float], rates: list[float], skipped: int,
                       totals: dict[str, float], ref_logprobs: torch.Tensor | None) -> dict[str, float]:
        iters = self.passes
        metrics = {
            "optim/loss": loss,
            "optim/grad_norm": float(np.mean(norms)) if norms else 0.0,
            "optim/grad_norm_max": float(np.max(norms)) if norms else 0.0,
            "optim/loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
            "optim/step_skipped": float(skipped),
            "optim/skipped_steps_total": float(self.counters["skipped_steps_total"]),
            "optim/empty_loss_steps_total": float(self.counters["empty_loss_steps_total"]),
            "policy/clip_ratio_low": totals.get("clip_ratio_low", 0.0) / iters,
            "policy/clip_ratio_high": totals.get("clip_ratio_high", 0.0) / iters,
        }
        if rates:
            metrics["optim/lr"] = float(np.mean(rates))
        if ref_logprobs is not None:
            metrics["policy/kl_ref"] = totals.get("kl_ref", 0.0) / iters
        if self.critic is not None:
            metrics["value/loss"] = totals.get("value_loss", 0.0) / iters
            metrics["value/clip_fraction"] = totals.get("value_clip_fraction", 0.0) / iters
        return metrics

    def _optimizer_step(self) -> tuple[int, float]:
        """Unscale, clip, step the FP32 masters, cast them into the model. An overflowed step is skipped.

        In fp16 the GradScaler finds inf/NaN, skips and lowers the scale; in bf16/fp32 a non-finite
        gradient norm skips the step the same way. Only a step taken advances the LR schedule.
        """
        trainables = [self.weights] + ([self.critic.weights] if self.critic else [])  # PPO: one norm over both
        for weights in trainables:
            weights.grads_to_masters()
        self.scaler.unscale_(self.optimizer)
        masters = [m for weights in trainables for m in weights.masters]
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(masters, self.config.max_grad_norm)))
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
        for weights in trainables:
            weights.zero_grad()
            if not skipped:
                weights.masters_to_model()
        if not skipped:
            self.scheduler.step()
        return skipped, grad_norm

    # --- outputs -------------------------------------------------------------------------------

    def save(self, step: int) -> Any:
        """Write the checkpoint of ``step`` (rank 0; every rank holds the same weights and optimizer state)."""
        self.saved_steps.add(step)
        masters = self.weights.full_masters()  # collectives: every rank joins, rank 0 writes
        optimizer_state = self.optimizer.state_dict()
        if self.sharded:
            optimizer_state = full_optimizer_state(optimizer_state)
        if not self.parallel.is_main:
            return None
        state = {**self.counters, "data_position": step, "precision": self.precision_report,
                 "world_size": self.parallel.world_size}
        path = save_checkpoint(self.run_dir, step, masters, self.model, optimizer_state, self.scheduler, self.scaler,
                               state, {"critic": self.critic.weights.named_masters()} if self.critic else None)
        if self.config.save_total_limit is not None:
            prune_checkpoints(self.run_dir, self.config.save_total_limit, keep=self.resumed_from)
        return path
