"""A short supervised warm start, so a tiny random model writes runnable code before RL.

RL can only reinforce what the policy already samples: a random tiny model never writes a
```python block, so every reward is 0 and every advantage is 0. A few hundred next-token steps on
(prompt, reference completion) pairs teach it the format; RL then has something to select from.
The arc-lite recipe that uses it (cached warm model, RL dataset, options) is ``tasks/arc/lite.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from fp16rl.core.atomic import atomic_directory
from fp16rl.model.loading import load_model, load_tokenizer, resolve_model_path
from fp16rl.runs.folders import refuse_used_folder
from fp16rl.tasks.base import encode_text
from fp16rl.runs.tracking import Progress

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
WARM_START_LOG = "warm_start.json"  # settings, time and loss curve, written into the model folder


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) per pair: the completion plus EOS is learned, the prompt is masked.

    Prompt and completion are tokenized apart because the sampler continues the prompt's token
    ids, so these are the tokens RL will sample; EOS is what stops the sampler.
    """
    encoded = []
    for prompt, completion in pairs:
        prompt_ids = encode_text(tokenizer, prompt)
        completion_ids = encode_text(tokenizer, completion) + [tokenizer.eos_token_id]
        encoded.append((prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids))
    return encoded


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels). Causal attention never lets a real token see the trailing
    pads, so no attention mask is needed, which lets SDPA use its fast causal kernel."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
    return input_ids, labels


def _loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens, and their count."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def completion_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], batch_size: int = 8
) -> float:
    """Mean next-token loss per completion token (EOS included) of ``pairs``."""
    examples = encode_pairs(tokenizer, pairs)
    total, count = 0.0, 0
    for begin in range(0, len(examples), batch_size):
        loss, tokens = _loss_sum(model, *collate(examples[begin : begin + batch_size], tokenizer.pad_token_id))
        total, count = total + float(loss), count + tokens
    return total / max(count, 1)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Attention probabilities and Adam's second moments underflow into fp32 denormals, which CPUs
    process about 10x slower (measured: 2 s vs 0.2 s per step here); values below 1e-38 do not
    matter to this loss, so flush them to zero while training."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def warm_start(
    model_path: str | os.PathLike,
    pairs: Sequence[tuple[str, str]],
    output_dir: str | os.PathLike,
    steps: int = 300,
    learning_rate: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
) -> Path:
    """Fine-tune all weights (fp32, AdamW, 5% warm-up then cosine decay, clip 1.0) on the
    completions of ``pairs`` for ``steps`` batches, taken from seeded shuffles of the pairs; write
    model + tokenizer (+ ``warm_start.json``) as one HF folder at ``output_dir``, atomically."""
    from transformers import get_scheduler

    if steps < 1 or batch_size < 1 or not pairs:
        raise ValueError(
            f"warm start needs steps >= 1, batch_size >= 1 and pairs; got {steps}, {batch_size}, {len(pairs)} pairs"
        )
    output_dir = Path(output_dir)
    refuse_used_folder(output_dir, "output folder")
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, torch.float32).train()
    examples = encode_pairs(tokenizer, pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.05 * steps), num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    with flush_denormals(), Progress("warm start", steps, enabled=show_progress) as progress:
        for _ in range(steps):
            if len(order) < batch_size:  # append the next shuffled pass
                order += torch.randperm(len(examples), generator=generator).tolist()
            rows, order = order[:batch_size], order[batch_size:]
            loss_sum, tokens = _loss_sum(model, *collate([examples[i] for i in rows], tokenizer.pad_token_id))
            (loss_sum / max(tokens, 1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum.item() / max(tokens, 1))
            progress.update(advance=1, description=f"loss {losses[-1]:.3f}")
    log = {
        "base_model": str(resolve_model_path(model_path)),
        "pairs": len(pairs),
        "steps": steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "losses": [round(v, 5) for v in losses],
    }
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / WARM_START_LOG).write_text(json.dumps(log, indent=1))
    return output_dir


def read_warm_start_log(model_path: str | os.PathLike) -> dict[str, Any]:
    """The ``warm_start.json`` of a warm-started model folder."""
    return json.loads((Path(model_path) / WARM_START_LOG).read_text())
