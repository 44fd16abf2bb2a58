"""A short supervised warm start, so a tiny random model writes parseable code before RL.

RL can only reinforce what the policy already samples: a random tiny model never writes a
```python block, so every reward is 0 and every advantage is 0. A few hundred next-token steps on
(prompt, reference completion) pairs teach it the format; RL then has something to select from.
The arc-lite warm model and its RL dataset are cached under ``fp16rl_home()`` like prepared models.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase, get_scheduler

from fp16rl.atomic import atomic_directory, atomic_write_text
from fp16rl.models import TinyModelSpec, fp16rl_home, load_model, load_tokenizer, resolve_model_path, tiny_model_path
from fp16rl.tasks.arc.encoders import DigitEncoder
from fp16rl.tasks.arc.synthetic import generate_tasks, sft_pairs, write_synthetic

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
WARM_START_LOG = "warm_start.json"  # settings and loss curve, written into the model folder


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per pair: the completion plus EOS is learned, the prompt is masked.

    Prompt and completion are tokenized apart (as the sampler sees them: it continues the prompt's
    token ids), so the learned tokens are the ones RL will sample.
    """
    encoded = []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids))
    return encoded


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: causal attention never lets a real token see the trailing pads."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
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
        loss, tokens = _token_loss_sum(model, collate(examples[begin : begin + batch_size], tokenizer.pad_token_id))
        total, count = total + float(loss), count + tokens
    return total / max(count, 1)


def warm_start(
    model_path: str | os.PathLike,
    pairs: Sequence[tuple[str, str]],
    output_dir: str | os.PathLike,
    steps: int = 300,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
) -> Path:
    """Fine-tune all weights (fp32, AdamW, warm-up then cosine decay) on the completions of
    ``pairs`` for ``steps`` batches, cycling through seeded shuffles; write model + tokenizer as
    one HF folder at ``output_dir`` (atomically) with a ``warm_start.json`` of the loss curve."""
    if steps < 1 or batch_size < 1 or not pairs:
        raise ValueError(f"warm start needs steps >= 1, batch_size >= 1 and pairs, got {steps}, {batch_size}, {len(pairs)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"output folder {output_dir} exists and is not empty; refusing to overwrite it")
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
    progress = _progress(steps) if show_progress else nullcontext()
    with progress:
        for step in range(steps):
            if len(order) < batch_size:  # next shuffled pass; a batch never repeats a pair
                order += torch.randperm(len(examples), generator=generator).tolist()
            rows, order = order[:batch_size], order[batch_size:]
            loss_sum, tokens = _token_loss_sum(model, collate([examples[i] for i in rows], tokenizer.pad_token_id))
            loss = loss_sum / max(tokens, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if show_progress:
                progress.update(progress.task_ids[0], advance=1, description=f"warm start  loss {losses[-1]:.3f}")
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
        atomic_write_text(tmp / WARM_START_LOG, json.dumps(log, indent=1))
    return output_dir


def _progress(steps: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True))
    progress.add_task("warm start", total=steps)
    return progress


# --- arc-lite ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArcLiteSettings:
    """Everything the cached arc-lite warm model depends on; its cache name encodes all of it."""

    num_tasks: int = 256  # warm-start tasks (their pairs are shown once per pass)
    seed: int = 0  # generator seed of the warm-start tasks and of the SFT run
    min_side: int = 3
    max_side: int = 5
    steps: int = 300
    learning_rate: float = 3e-3
    batch_size: int = 8
    model: TinyModelSpec = field(default_factory=TinyModelSpec)

    @property
    def name(self) -> str:
        m = self.model
        return (f"arc-lite-warm-{m.arch}-h{m.hidden_size}-l{m.num_hidden_layers}-v{m.vocab_size}-s{m.seed}"
                f"-n{self.num_tasks}-d{self.seed}-g{self.min_side}x{self.max_side}"
                f"-st{self.steps}-lr{self.learning_rate:g}-b{self.batch_size}")


def arc_lite_warm_model(settings: ArcLiteSettings = ArcLiteSettings(), show_progress: bool = False) -> Path:
    """The cached warm-started tiny model for arc-lite (digits encoder, default prompt), built on first use."""
    path = fp16rl_home() / "models" / settings.name
    if (path / "config.json").is_file():
        return path
    base = tiny_model_path(settings.model)
    tasks, programs = generate_tasks(settings.num_tasks, settings.seed, settings.min_side, settings.max_side)
    pairs = list(sft_pairs(tasks, programs, load_tokenizer(base), DigitEncoder()))
    return warm_start(base, pairs, path, settings.steps, settings.learning_rate, settings.batch_size, settings.seed,
                      show_progress)


def arc_lite_dataset(num_tasks: int, seed: int, min_side: int = 3, max_side: int = 5) -> Path:
    """A cached arc-lite task map (``.json.gz`` with its programs side file), written on first use."""
    folder = fp16rl_home() / "data" / f"arc-lite-n{num_tasks}-s{seed}-g{min_side}x{max_side}"
    path = folder / "arc-lite.json.gz"
    if not path.is_file():
        with atomic_directory(folder) as tmp:
            write_synthetic(tmp / path.name, num_tasks, seed, min_side, max_side)
    return path
