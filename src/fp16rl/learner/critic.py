"""PPO's value model: a value head ``nn.Linear(hidden, 1)`` on a decoder stack, trained with the policy.

With LoRA the critic is the policy's own peft model with a second adapter, ``critic`` (peft multi-adapter:
``add_adapter``, ``set_adapter``): the frozen base is shared, so the critic costs one more adapter, its
optimizer state and a head. In full fine-tuning it is a copy of the decoder stack (no ``lm_head``): a second
set of trainable weights with its own FP32 masters and AdamW moments, so the trainable memory doubles,
minus the embedding/unembedding when they are tied.

Its weights are kept as the policy's are (``MasterWeights``: FP32 masters, a compute copy in the trainer
dtype), its forward runs in the same compute context (``PrecisionPolicy.autocast``), and its parameters are
a second set of groups of the one AdamW, under the one loss scaler, the one gradient clip and the one LR
schedule, as TRL's PPOTrainer optimises its ``PolicyAndValueWrapper`` (``loss = pg_loss + vf_coef *
vf_loss``). The policy and the value losses are backpropagated one after the other (the sum's gradient):
with LoRA the active adapter must stay the critic's through the value loss's backward, where non-reentrant
activation checkpointing recomputes the layers.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from fp16rl.model.forward import TokenBatch, backbone, causal_lm
from fp16rl.model.precision import PrecisionPolicy
from fp16rl.learner.weights import MasterWeights

CRITIC = "critic"  # the peft adapter's name
POLICY = "default"  # peft's name for the policy's adapter


def copy_backbone(model: nn.Module) -> nn.Module:
    """The full fine-tuning critic's decoder stack: a copy of the policy's, taken while its weights are still
    FP32 (before ``MasterWeights`` casts the compute copy), so the critic's masters start exact."""
    return copy.deepcopy(backbone(model))


class CriticModel(nn.Module):
    """Decoder stack + value head; ``body`` is the peft policy model (LoRA) or a copy of the decoder stack."""

    def __init__(self, body: nn.Module, hidden_size: int, shares_policy: bool):
        super().__init__()
        self.body = body
        self.shares_policy = shares_policy
        self.value_head = nn.Linear(hidden_size, 1)
        # OpenRLHF's initialisation: small values at the start, whatever the hidden size.
        nn.init.normal_(self.value_head.weight, std=1 / (hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens: TokenBatch) -> torch.Tensor:
        """``V_t`` ``[N, C]`` in fp32, 0 where masked: the head on the hidden state that predicts completion
        token ``t`` (position ``P - 1 + t``, the one ``completion_logprobs`` reads)."""
        stack = backbone(self.body) if self.shares_policy else self.body
        out = stack(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    position_ids=tokens.position_ids, use_cache=False)
        width = tokens.completion_ids.shape[1]
        start = tokens.prompt_width - 1
        hidden = out.last_hidden_state[:, start: start + width]
        return self.value_head(hidden).squeeze(-1).float() * tokens.completion_mask


class Critic:
    """The value model, its FP32 masters (``weights``), and the switch to its adapter."""

    def __init__(self, model: nn.Module, copied_backbone: nn.Module | None, policy: PrecisionPolicy,
                 device: torch.device):
        """``copied_backbone``: ``copy_backbone(model)`` in full fine-tuning, None with LoRA (``model`` is peft)."""
        self.policy_model = model
        self.lora = copied_backbone is None
        hidden = causal_lm(model).config.hidden_size
        if self.lora:
            config = copy.deepcopy(model.peft_config[POLICY])
            config.inference_mode = False
            model.add_adapter(CRITIC, config)
            model.set_adapter(POLICY)
            self._adapter_params = [p for n, p in model.named_parameters() if f".{CRITIC}." in n]
            for param in self._adapter_params:  # trainable, created in FP32 like the policy's adapter
                param.data = param.data.float()
            self._policy_params = [p for p in model.parameters() if p.requires_grad]
            self._restore_trainable()
            body = model
        else:
            body = copied_backbone.requires_grad_(True)
        self.module = CriticModel(body, hidden, shares_policy=self.lora).to(device)
        self.weights = MasterWeights(self.module, policy, only=self._is_critic_weight)

    def _is_critic_weight(self, name: str) -> bool:
        return not self.lora or f".{CRITIC}." in name or name.startswith("value_head.")

    def _restore_trainable(self) -> None:
        """peft's ``set_adapter`` freezes the adapters that are not active: both stay trainable here (the
        policy's and the critic's gradients meet in one optimizer step)."""
        for param in (*self._policy_params, *self._adapter_params):
            param.requires_grad_(True)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The critic's adapter in the shared model for the enclosed forwards and backwards (LoRA)."""
        if not self.lora:
            yield
            return
        self.policy_model.set_adapter(CRITIC)
        self._restore_trainable()
        try:
            yield
        finally:
            self.policy_model.set_adapter(POLICY)
            self._restore_trainable()

    @torch.no_grad()
    def rollout_values(self, tokens: TokenBatch, policy: PrecisionPolicy, rows: int) -> torch.Tensor:
        """``V_old``: the values of a whole batch before the step, in micro-batches of ``rows`` completions."""
        parts = []
        with self.active(), policy.autocast(tokens.input_ids.device.type):
            for begin in range(0, tokens.input_ids.shape[0], rows):
                parts.append(self.module(tokens.select(slice(begin, begin + rows))))
        return torch.cat(parts)
