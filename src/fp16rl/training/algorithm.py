"""The interface of an RL algorithm (``Algorithm``) and what the step hands it.

Every algorithm shares the step around it (``Trainer.step``): sample, score, pi_old and the mismatch
telemetry, then the optimizer passes over GA micro-batches (``optimize.py``) and the sampler's sync. An
algorithm adds only what differs: the ``RolloutBatch`` its loss needs of a generation batch
(``loss_batch``: GRPO's group advantages, PPO's values and GAE, online DPO's pairs), the backward of
one part's loss (``backward``), the metrics its loss adds (``summary``), and set-up hooks (a reference,
a critic). One module per algorithm (``grpo_step.py``, ``ppo_step.py``, ``dpo_step.py``) wires the pure
formulas of ``fp16rl.algo``; ``algorithms.py`` registers them by ``--algorithm`` name.

The algorithms receive a ``LossContext`` (the run's pieces they read), never the ``Trainer``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fp16rl.algo.batch import RolloutBatch
from fp16rl.algo.grpo import LossSettings
from fp16rl.config.options import TrainConfig
from fp16rl.learner.critic import Critic
from fp16rl.learner.distributed import DataParallel, WholeBatch
from fp16rl.learner.reference import LogprobsFn, ReferencePolicy
from fp16rl.model.forward import TokenBatch
from fp16rl.model.precision import PrecisionPolicy


@dataclass(frozen=True)
class LossContext:
    """What an algorithm reads of the run once the models are built (``Algorithm.attach``)."""

    config: TrainConfig
    model: torch.nn.Module  # the policy (PPO's LoRA critic adds its adapter to it)
    policy: PrecisionPolicy
    device: torch.device
    parallel: DataParallel
    rows: int  # completions per trainer forward (--per-device-train-batch-size)
    score: LogprobsFn  # the trainer's logprobs of another model's batch: the reference's
    reference: ReferencePolicy | None

    def reference_logprobs(self, tokens: TokenBatch) -> torch.Tensor | None:
        """The reference's token logprobs of ``tokens`` (no grad), None without a reference."""
        return self.reference.logprobs(self.score, tokens) if self.reference is not None else None


@dataclass(frozen=True)
class StepRows:
    """This rank's rows of the step's generation batch, as an algorithm builds its loss batch from them;
    ``whole``: every rank's rows (group advantages, pairs and metrics are the whole batch's)."""

    whole: WholeBatch
    tokens: TokenBatch
    old_logprobs: torch.Tensor | None  # pi_old [n, C]; None where the loss's forward gives it (``pi_old.py``)
    sampler_logprobs: torch.Tensor  # mu [n, C]
    is_weights: torch.Tensor | None  # the whole batch's IS weights [N, C]; None with pi_old from the forward
    loss_mask: torch.Tensor  # [n, C] bool: the completion tokens in the loss


@dataclass(frozen=True)
class LossNorm:
    """How one part's loss is normalised so that the parts add up to the generation batch's loss whatever
    the split (``fp16rl.algo.grpo.aggregate``)."""

    accumulation: int  # gradient-accumulation micro-batches
    batch_tokens: int  # loss tokens of the whole generation batch, every rank's
    group: tuple[int, int] | None  # (rows, loss tokens) of the micro-batch when the part is only a piece of it


EMPTY_LOSS_WARNING = ("step {step}: no completion token is in the loss (all truncated and "
                      "--mask-truncated-completions is on), so the step trained on nothing; raise "
                      "--max-completion-length (counted in optim/empty_loss_steps_total)")


class Algorithm(ABC):
    """One RL algorithm's part of the step; the defaults are the GRPO family's.

    Attributes: ``passes``, the optimizer steps per generation batch (``--num-iterations``);
    ``recomputes_pi_old``, whether the loss reads pi_old before its own forward, so that pi_old needs the
    separate recompute after sampling (otherwise the training forward gives it, ``pi_old.py``);
    ``uses_reference``, whether the run builds a ``ReferencePolicy``; ``critic``, a value model trained
    with the policy (in the same optimizer step, clip and checkpoint), None but for PPO.
    """

    critic: Critic | None = None

    def __init__(self, config: TrainConfig):
        self.config = config
        self.passes = config.num_iterations
        self.recomputes_pi_old = self.passes != 1  # after the first pass pi_old is no longer the policy
        self.uses_reference = config.beta != 0.0
        self.context: LossContext | None = None

    def before_cast(self, model: torch.nn.Module, adapters: bool) -> None:
        """Called with the freshly loaded policy while its weights are still FP32, before ``MasterWeights``
        casts the compute copy (PPO copies the critic's backbone here)."""

    def attach(self, context: LossContext) -> None:
        """Called once the policy, its reference and the sampler are built, before the optimizer (which
        takes the critic's weights too)."""
        self.context = context

    def notes(self) -> list[str]:
        """Warnings about options this algorithm ignores (config.yaml's ``notes``)."""
        return []

    @abstractmethod
    def loss_batch(self, rows: StepRows, metrics: dict[str, float]) -> RolloutBatch:
        """This rank's rows as the loss needs them; the metrics computed on the way go into ``metrics``."""

    @abstractmethod
    def backward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, part: RolloutBatch, norm: LossNorm,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backpropagate one part's loss through ``scaler``, given the policy's ``logprobs`` of it (with
        gradient) and pi_old; returns the loss's value and its statistics, each a fraction of the batch's
        loss tokens, so that they add up over parts, micro-batches and ranks."""

    def summary(self, totals: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
        """Metrics the step's optimizer passes add or replace (``optim/*`` is shared), from ``totals``, the
        statistics of ``backward`` summed over parts and ranks, and the step's ``metrics`` so far."""
        return {}

    def empty_loss_warning(self, step: int) -> str:
        """What the first step whose loss covers no token warns."""
        return EMPTY_LOSS_WARNING.format(step=step)

    def sample_advantages(self, batch: RolloutBatch) -> list[float] | None:
        """The advantage of each of this rank's completions as the completions table shows it (samples/),
        from the ``loss_batch`` it returned; None when the algorithm has none. The GRPO family's is one
        per completion: the group advantage ``batch.advantages``."""
        return [float(a) for a in batch.advantages.tolist()]


def loss_settings(config: TrainConfig) -> LossSettings:
    """The clipped surrogate's options (GRPO's and PPO's policy loss)."""
    return LossSettings(loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
                        epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
                        max_completion_length=config.max_completion_length)
