"""The RL loop: sample -> reward -> pi_old + mismatch -> the algorithm's loss batch -> loss -> (scaled)
step -> sync.

Readable top to bottom on purpose (nanoGPT style): ``Trainer.step`` is one step in five phases, the same
for every algorithm; what differs (GRPO's group advantages, PPO's critic and GAE, online DPO's pairs, and
each one's loss) is the ``Algorithm`` of ``algorithms.py``. The optimizer passes are ``optimize.py``, the
models' set-up ``setup.py``; checkpoints and logging are around the loop. The README's "One step"
section draws the same flow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from typing import Any, Sequence

import torch
import yaml

from fp16rl.algo.batch import RolloutBatch
from fp16rl.algo.grpo import Correction
from fp16rl.config.options import TrainConfig
from fp16rl.core.atomic import atomic_write_text
from fp16rl.core.scores import Scores
from fp16rl.core.seeds import step_seed
from fp16rl.learner.critic import Critic
from fp16rl.learner.distributed import DataParallel, WholeBatch
from fp16rl.learner.fsdp import full_optimizer_state, shard_optimizer_state
from fp16rl.learner.logprobs import LogitHead
from fp16rl.learner.weights import MasterWeights
from fp16rl.measure.pi_old import FromTrainingForward, is_denominator
from fp16rl.measure.rollouts import Measurement, RolloutRequest, TrainerForward, measure_rollouts
from fp16rl.measure.staleness import StepTelemetry
from fp16rl.model.forward import TokenBatch, dropout_active
from fp16rl.model.hardware import keep_freed_memory, library_versions, resolve_threads
from fp16rl.model.loading import load_tokenizer, model_folder, require_4bit_support, resolve_device
from fp16rl.model.precision import PrecisionPolicy, check_observed
from fp16rl.runs.checkpoint import prune_checkpoints, remove_torn_saves
from fp16rl.runs.folders import resume_history, summarize_run
from fp16rl.runs.tracking import ProgressDisplay, read_metrics
from fp16rl.tasks import make_task
from fp16rl.tasks.base import RunProgress, Task, encode_text
from fp16rl.training.algorithm import LossContext, StepRows
from fp16rl.training.algorithms import make_algorithm
from fp16rl.training.budget import enforce_budget
from fp16rl.training.checkpoint_io import load_checkpoint, save_checkpoint, seed_everything
from fp16rl.training.completions import CompletionRows, gathered_records
from fp16rl.training.interrupt import RunInterrupted, StopRequest
from fp16rl.training.monitor import CollapseEvent, monitor_for
from fp16rl.training.optimize import BatchOptimizer, scaled_optimizer_step
from fp16rl.training.pipeline import AsyncRollouts, RolloutSide, Sampled, WeightHistory, refuse_in_sampler_process
from fp16rl.training.plan import check_ranks, plan_run
from fp16rl.training.run_notes import check_resumed_precision, run_notes
from fp16rl.training.setup import build_learner, build_optimizer, sampling_params
from fp16rl.training.step_metrics import step_metrics
from fp16rl.training.trackers import RunTracker

logger = logging.getLogger("fp16rl")


class Trainer:
    """Owns the models, the sampler, the optimizer and the run folder of one training run."""

    def __init__(self, config: TrainConfig, task: Task | None = None, dataset: Any = None,
                 reward_funcs: Sequence[Any] | None = None):
        """``task``, or ``dataset`` (+ ``reward_funcs``), replace what ``config.dataset_path`` names (the
        Python API: ``fp16rl.train``). Under torchrun every rank builds one (``fp16rl.learner.distributed``)."""
        config.validate()
        refuse_in_sampler_process()  # a script re-imported by --max-staleness's spawned sampler
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
        # Once everything loaded (a refused run prints its one error line only): what the user should read first.
        self.notes = run_notes(config, self.policy, self.device, self.algorithm.notes(), self.parallel.enabled,
                               self.threads_note, self.rope_note)
        for note in self.notes if self.parallel.is_main else []:
            logger.warning(note)
        self.run_dir = plan.create() if self.parallel.is_main else plan.run_dir  # the first write
        self.tracker: RunTracker | None = None
        if self.parallel.is_main:
            remove_torn_saves(self.run_dir)
            self.tracker = RunTracker(self.run_dir, resume_step=self.start_step if plan.resume_from else None,
                                      report_to=config.report_to, config=config.to_dict())
        self.monitor = monitor_for(self.task)
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
        self.cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else None
        if config.load_in_4bit:
            require_4bit_support(self.device)
        self.policy = PrecisionPolicy.from_options(config.dtype, config.sampler_dtype, config.trainer_dtype,
                                                   config.loss_scale_growth_interval, config.trainer_compute,
                                                   config.fp32_modules)
        seed_everything(config.seed)
        self.sharded = config.fsdp and self.parallel.enabled
        model_path = model_folder(config.model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.task = task or make_task(config, self.tokenizer, dataset, reward_funcs)  # before the model: fails fast
        self.algorithm = make_algorithm(config)
        learner = build_learner(config, model_path, self.tokenizer, self.policy, self.device, self.sharded,
                                self.algorithm)
        self.model, self.weights, self.head = learner.model, learner.weights, learner.head
        self.gradient_checkpointing, self.share_prompts = learner.gradient_checkpointing, learner.share_prompts
        self.rope_note, self.reference, self.sampler = learner.rope_note, learner.reference, learner.sampler
        self.algorithm.attach(LossContext(config, self.model, self.policy, self.device, self.parallel,
                                          self._forward_rows(), self.logprobs, self.reference))
        self.sampling = sampling_params(config)
        self.correction = Correction(config.is_correction, config.is_clip_max, config.is_clip_min)
        self.total_steps = self._total_steps()
        self.optimizer, self.scheduler = build_optimizer(config, self.weights, self.model, self.critic,
                                                         self.total_steps * self.algorithm.passes)
        self.scaler = self.policy.grad_scaler(self.device.type, sharded=self.sharded)
        self.start_step = plan.resume_step
        self.counters = {"skipped_steps_total": 0, "empty_loss_steps_total": 0}
        # --max-staleness K: the weight versions steps in flight sample with; the sampler process and scorer
        self.history = WeightHistory(config.max_staleness) if config.max_staleness else None
        self.pipeline: AsyncRollouts | None = None
        self.precision_report: dict[str, Any] | None = None  # observed afresh at the first step, resumed or not
        return self._read_resume(plan.resume_from)

    def _read_resume(self, checkpoint: Any) -> dict | None:
        """Rank 0 reads the checkpoint to resume from (None: a new run) and returns what the other ranks
        need of it (``_resumed``)."""
        if checkpoint is None or not self.parallel.is_main:
            return None
        more = {"critic": self.critic.weights.load} if self.critic else {}
        if self.history is not None:
            more["stale_weights"] = self.history.load
        state = load_checkpoint(checkpoint, self.weights.load, self.optimizer, self.scheduler, self.scaler, more or None)
        check_resumed_precision(self.policy, state.get("precision"), checkpoint)
        if self.history is not None:
            self.history.require(state["step"], f"checkpoint {checkpoint}")
        if not self.parallel.enabled:
            return state
        return {"state": state, "masters": {k: v.detach().cpu() for k, v in self.weights.named_masters().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    @property
    def critic(self) -> Critic | None:
        """PPO's value model, trained with the policy (None for the other algorithms)."""
        return self.algorithm.critic

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
        optimizer_state, schedule_state = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.weights = MasterWeights(self.model, self.policy, sharded=True)
        self.optimizer, self.scheduler = build_optimizer(self.config, self.weights, self.model, None,
                                                         self.total_steps * self.algorithm.passes)
        in_groups = [p for group in self.optimizer.param_groups for p in group["params"]]  # the state's numbering
        self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, in_groups))
        self.scheduler.load_state_dict(schedule_state)

    # --- notes and records ---------------------------------------------------------------------

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
            "cpu_threads": self.cpu_threads,
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
                    enforce_budget(self, step, metrics)  # over --mismatch-budget: logged, then stopped
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
            for weights in self._trainables():
                weights.zero_grad()
            if last_done not in self.saved_steps:
                self.save(last_done)
        except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint, but say what happened
            self.status = "interrupted"
            raise
        finally:
            if self.pipeline is not None:  # the sampler process and the scoring thread end with the run
                self.pipeline.close()
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
        """One RL step (1-based ``step``) of the run's algorithm, ``stop`` polled at safe points; its metrics."""
        cfg, t0 = self.config, time.perf_counter()
        stop = stop or StopRequest()

        # 1. Rollouts from the sampler (sampler dtype, their logprobs mu) and the trainer's logprobs of
        #    the same tokens at the same weights (pi_old): the measurement the probe makes too.
        #    With --max-staleness K they come sampled at the weights of step t-K, and scored, from the
        #    pipeline (``pipeline.py``), with the trainer's logprobs at those weights too.
        fused = self._pi_old_from_training()
        got = self._async_rollouts(step, stop, fused) if self.history else self._sample_and_score(step, stop, fused)
        measured, scores = got.measured, got.scores
        split = StepTelemetry(self.correction, cfg.is_reference, cfg.decoupled_loss, got.stale,
                              self.parallel.gather_rows(got.stale))  # K >= 1: mismatch and staleness apart
        rollouts, tokens = measured.rollouts, measured.tokens

        # 2. Rewards (scored with the rollouts); the whole batch (every rank's part) for group advantages and
        #    every metric.
        mu, behaviour = rollouts.sampler_logprobs.to(self.device), rollouts.behaviour_logprobs.to(self.device)
        whole = self._whole_batch(scores, measured, got.token_lists)
        stop.check()
        t_scored = time.perf_counter()

        # 3. The mismatch on every sampled token, the IS weights, the loss tokens; the algorithm's loss batch
        #    (GRPO: group advantages, the reference; PPO: values, GAE; online DPO: pairs, their loss weights).
        #    pi_old from the training forward (``pi_old.py``): the metrics follow the loss.
        t_metrics = time.perf_counter()
        metrics, is_weights = ({}, None) if fused else split.measure(whole)
        mismatch_s = measured.recompute_s + time.perf_counter() - t_metrics
        loss_mask = self._loss_mask(tokens, rollouts.truncated)
        batch = self.algorithm.loss_batch(StepRows(whole, tokens, split.loss_old(measured.old_logprobs), mu,
                                                   is_weights, loss_mask), metrics)
        collected = split.collector(is_denominator(cfg.is_reference, mu, behaviour), tokens.completion_mask,
                                    vocab=measured.vocab) if fused else None

        # 4. Loss, backward (scaled in fp16), unscale, clip, step or skip; then sync the sampler.
        optim_metrics = self._optimize(batch, stop, step, metrics, collected)
        if collected is not None:
            whole, mismatch_s = self._telemetry_from_forward(whole, collected, metrics, split)
        if self.pipeline is None:
            self.sampler.sync_from(self.weights.full_masters())
        else:  # the new weights are the version step + 1 + K samples with
            self.pipeline.advance(step, self.weights.full_masters())

        # 5. Metrics (of the whole batch; times are this rank's).
        times = {"t0": t0, "reward_s": got.reward_s, "scored": t_scored, "trained": time.perf_counter(),
                 "mismatch_s": mismatch_s}
        metrics.update(step_metrics(whole, measured, optim_metrics, times, self.algorithm.passes,
                                    self.parallel), **got.extra)
        if step % cfg.save_samples_steps == 0 or step == 1:  # every rank: the whole batch's records are gathered
            self._log_samples(step, CompletionRows(got.grouped_items, got.completions, rollouts.finish_reasons,
                                                   scores, self.algorithm.sample_advantages(batch)))
        return metrics

    def _sample_and_score(self, step: int, stop: StopRequest, fused: bool) -> Sampled:
        """The synchronous loop's rollouts of ``step`` (``_sample``), decoded and scored."""
        items, measured = self._sample(step, stop, recompute=not fused)
        token_lists = measured.rollouts.completion_lists()
        completions = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        t_reward = time.perf_counter()
        grouped_items = [item for item in items for _ in range(self.config.num_generations)]
        scores = self.task.score(grouped_items, completions, measured.rollouts.truncated, token_lists,
                                 progress=RunProgress(global_step=step - 1, max_steps=self.total_steps))
        return Sampled(grouped_items, measured, completions, token_lists, scores, time.perf_counter() - t_reward)

    def _async_rollouts(self, step: int, stop: StopRequest, fused: bool) -> Sampled:
        """``step``'s rollouts from the pipeline (started at the first step this process runs)."""
        if self.pipeline is None:
            self.history.record(step - 1, self.weights.full_masters())
            self.pipeline = AsyncRollouts(RolloutSide(self.config, self.task, self.tokenizer, self.sampler,
                                                      self.sampling, self.total_steps, self.cpu_threads, self.device),
                                          self.history, step - 1)
        got = self.pipeline.take(step, stop, self._forward(), self.weights, recompute=not fused)
        self._observe(got.measured)
        return got

    def _whole_batch(self, scores: Scores, measured: Measurement, token_lists: list[list[int]]) -> WholeBatch:
        """This rank's rewards and per-token tensors joined with every other rank's (``DataParallel``)."""
        rollouts, device = measured.rollouts, self.device
        return self.parallel.whole_batch(scores, rollouts.sampler_logprobs.to(device),
                                         rollouts.behaviour_logprobs.to(device), rollouts.kept_mass.to(device),
                                         measured.old_logprobs, measured.tokens.completion_mask, measured.entropy,
                                         rollouts.truncated, token_lists)

    def _log_samples(self, step: int, rows: CompletionRows) -> None:
        """samples/ and the trackers' completions table: every rank's records, gathered (a collective)."""
        records = gathered_records(self.parallel, rows)
        if self.tracker is not None:
            self.tracker.log_samples(step, records)

    def _loss_mask(self, tokens: TokenBatch, truncated: Sequence[bool]) -> torch.Tensor:
        """The completion tokens in the loss: all, or with ``--mask-truncated-completions`` those of the
        completions that ended."""
        loss_mask = tokens.completion_mask.clone()
        if self.config.mask_truncated_completions:
            loss_mask[torch.tensor(truncated, device=self.device)] = False
        return loss_mask

    def _telemetry_from_forward(self, whole: WholeBatch, collected: FromTrainingForward, metrics: dict[str, float],
                                split: StepTelemetry) -> tuple[WholeBatch, float]:
        """The mismatch metrics (into ``metrics``) once the training forward has given pi_old and the entropy
        of every row (``pi_old.py``); returns the whole batch with them and the metrics' seconds."""
        t_metrics = time.perf_counter()
        whole = replace(whole, old_logprobs=self.parallel.gather_rows(collected.old),
                        entropy=self.parallel.gather_rows(collected.entropy))
        metrics.update(split.measure(whole)[0])
        return whole, time.perf_counter() - t_metrics

    def _sample(self, step: int, stop: StopRequest, recompute: bool) -> tuple[list[Any], Measurement]:
        """This rank's prompts of the step (with several ranks each samples its own: ``slots``, their places
        in the step's batch) and their measurement; ``recompute``: pi_old from a separate forward. The
        first step of a run checks the precision both engines computed in (config.yaml records it)."""
        cfg = self.config
        all_items = self.task.batch(step - 1, cfg.prompts_per_step)
        slots = self.parallel.shard(len(all_items))
        items = all_items[slots.start: slots.stop]
        prompt_ids = [encode_text(self.tokenizer, i.text) for i in items]
        max_rows = self.sampler.rows_per_call(cfg.generation_batch_size, cfg.gpu_memory_utilization, prompt_ids,
                                              cfg.max_completion_length, cfg.num_generations)
        request = RolloutRequest(prompt_ids, cfg.num_generations, self.sampling, step_seed(cfg.seed, step), slots,
                                 max_rows, cfg.vocab_parity_positions)
        measured = measure_rollouts(self.sampler, request, self._forward(), self.tokenizer.pad_token_id,
                                    with_entropy=True, should_stop=stop.check, watch=stop.watching_layers,
                                    recompute=recompute)
        self._observe(measured)
        return items, measured

    def _observe(self, measured: Measurement) -> None:
        """At a run's first step: check the precision both engines computed in (config.yaml records it)."""
        if self.precision_report is None:
            self.precision_report = check_observed(self.policy, measured.observed["sampler"],
                                                   measured.observed["trainer"], full_finetune=self.config.lora_r == 0)
            self._write_config()

    def _forward(self) -> TrainerForward:
        """The policy's compute path for the logprobs of a whole batch (``measure.rollouts``)."""
        cfg = self.config
        return TrainerForward(self.model, self.head, self.policy, cfg.temperature, self._forward_rows(),
                              cfg.logprob_chunk_tokens, self.wrapped, self.share_prompts)

    def logprobs(self, model: torch.nn.Module, tokens: TokenBatch, head: LogitHead | None = None) -> torch.Tensor:
        """Trainer-side logprobs of a whole batch (no entropy), in micro-batches and the compute context;
        ``head``: ``model``'s own (default: the policy's). The reference computes with it (``LogprobsFn``)."""
        return self._forward().score(model, tokens, head)

    def _micro_batch_size(self) -> int:
        """Completions per gradient-accumulation micro-batch on this rank: the seed script's meaning of GA
        (the generation batch in GA parts), each rank holding its share of every part."""
        cfg = self.config
        return cfg.prompts_per_step * cfg.num_generations // cfg.gradient_accumulation_steps // self.parallel.world_size

    def _forward_rows(self) -> int:
        """Completions per trainer forward: --per-device-train-batch-size, at most the micro-batch."""
        return min(self.config.per_device_train_batch_size or self._micro_batch_size(), self._micro_batch_size())

    def _pi_old_from_training(self) -> bool:
        """Whether this step takes pi_old from the loss's forward (``pi_old.py``): an algorithm whose loss
        does not read pi_old first (GRPO with one optimizer pass), after the first step (whose recompute
        records the trainer's dtypes), without dropout."""
        return (not self.algorithm.recomputes_pi_old and self.precision_report is not None
                and not dropout_active(self.model))

    def _optimize(self, batch: RolloutBatch, stop: StopRequest, step: int, metrics: dict[str, float],
                  collected: FromTrainingForward | None = None) -> dict[str, float]:
        """The algorithm's optimizer passes over the generation batch, each over GA micro-batches
        (``optimize.py``); ``metrics``: the step's so far."""
        optimizer = BatchOptimizer(self.algorithm, self._forward(), self.parallel, self._micro_batch_size(),
                                   self.config.gradient_accumulation_steps, self.sharded, self.scaler, self.optimizer,
                                   self._optimizer_step, self.counters, proximal=self.config.decoupled_loss)
        return optimizer.run(batch, stop, step, metrics, collected)

    def _trainables(self) -> list[MasterWeights]:
        """The weights each optimizer step updates: the policy's, and PPO's critic's."""
        return [self.weights] + ([self.critic.weights] if self.critic else [])

    def _optimizer_step(self) -> tuple[int, float]:
        """Unscale, clip, step the FP32 masters or skip an overflowed step (``scaled_optimizer_step``)."""
        return scaled_optimizer_step(self._trainables(), self.optimizer, self.scheduler, self.scaler,
                                     self.config.max_grad_norm)

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
        more = {"critic": self.critic.weights.named_masters()} if self.critic else {}
        if self.history is not None:  # the versions the steps in flight sample with: a resume regenerates them
            more["stale_weights"] = self.history.checkpoint_tensors(step)
        path = save_checkpoint(self.run_dir, step, masters, self.model, optimizer_state, self.scheduler, self.scaler,
                               state, more or None)
        if self.config.save_total_limit is not None:
            prune_checkpoints(self.run_dir, self.config.save_total_limit, keep=self.resumed_from)
        return path
