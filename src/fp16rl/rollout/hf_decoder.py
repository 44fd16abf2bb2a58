"""The generic decoding engine: incremental decoding through any Hugging Face causal LM.

``Sampler`` runs it for the models ``fast_decode.LlamaFamilyDecoder`` does not reproduce (other
architectures, sliding windows, attention kernels other than sdpa/eager), or when asked for
(``engine="hf"``); both engines offer the same interface to the decode loop.
"""

from __future__ import annotations

import torch

from fp16rl.model.forward import prefill_forward


class HFCacheDecoder:
    """Incremental decoding through any Hugging Face causal LM and its ``DynamicCache``.

    The state of one ``generate`` call: KV cache, attention mask and positions of the rows still
    decoding. ``prefill`` -> ``repeat_interleave(n)`` -> (``step`` | ``select``)*.
    """

    def __init__(self, model: torch.nn.Module, max_new_tokens: int):
        self.model = model
        self.max_new_tokens = max_new_tokens

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts; return the logits of their last position ``[P, V]``."""
        out = prefill_forward(self.model, input_ids, attention_mask)
        self.cache = out.cache
        width = input_ids.shape[1]
        # The mask for the whole call, filled column by column (no concatenation per step).
        self.mask = torch.zeros(
            input_ids.shape[0], width + self.max_new_tokens, dtype=torch.long, device=input_ids.device
        )
        self.mask[:, :width] = attention_mask
        self.positions = attention_mask.sum(-1) - 1  # position of each row's last token
        self.length = width
        return out.logits[:, -1]

    def repeat_interleave(self, n: int) -> None:
        """Fan each prompt's state out to ``n`` rows (prefix sharing: one prefill per prompt)."""
        self.cache.batch_repeat_interleave(n)
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.positions = self.positions.repeat_interleave(n, dim=0)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep``: finished rows leave the batch."""
        self.cache.batch_select_indices(keep)
        self.mask, self.positions = self.mask[keep], self.positions[keep]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next-token logits ``[B, V]``."""
        self.mask[:, self.length] = 1
        self.length += 1
        self.positions = self.positions + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask[:, : self.length],
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]
