"""A short supervised warm start, so a tiny random model writes runnable code before RL.

RL can only reinforce what the policy already samples: a random tiny model never writes a
```python block, so every reward is 0 and every advantage is 0. A few hundred next-token steps on
(prompt, reference completion) pairs teach it the format; RL then has something to select from.
The arc-lite warm model and its RL dataset are cached under ``fp16rl_home()`` like prepared models.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from fp16rl.atomic import atomic_directory
from fp16rl.models import TinyModelSpec, fp16rl_home, load_model, load_tokenizer, resolve_model_path, tiny_model_path
from fp16rl.tasks.arc.encoders import DigitEncoder
from fp16rl.tasks.arc.synthetic import generate_tasks, sft_pairs, write_synthetic

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
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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
    with flush_denormals(), _progress(steps, show_progress) as advance:
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
            advance(losses[-1])
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


@contextlib.contextmanager
def _progress(steps: int, show: bool) -> Iterator[Any]:
    """A rich bar on stderr with the current loss, or a no-op."""
    if not show:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]warm start"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("loss {task.fields[loss]}"), console=Console(stderr=True)) as progress:
        task = progress.add_task("warm start", total=steps, loss="-")
        yield lambda loss: progress.update(task, advance=1, loss=f"{loss:.3f}")


def read_warm_start_log(model_path: str | os.PathLike) -> dict[str, Any]:
    """The ``warm_start.json`` of a warm-started model folder."""
    return json.loads((Path(model_path) / WARM_START_LOG).read_text())


# --- arc-lite ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArcLiteSettings:
    """Everything the cached arc-lite warm model depends on; its cache name encodes all of it."""

    num_tasks: int = 256  # warm-start tasks (seed ``seed``): held out from the RL tasks below
    seed: int = 0  # generator seed of the warm-start tasks and seed of the SFT run
    min_side: int = 3
    max_side: int = 5  # small grids keep prompts short (~670 tokens, 470 of them fixed text)
    steps: int = 300
    learning_rate: float = 1e-2
    batch_size: int = 8
    # The default 64-wide, 2-layer tiny model: after 300 steps ~60% of its samples run. A 128-wide
    # one (300 steps) ran no more often and cost ~3x per step, so the small one is the cheap choice.
    model: TinyModelSpec = field(default_factory=TinyModelSpec)

    @property
    def name(self) -> str:
        m = self.model
        return (f"arc-lite-warm-{m.arch}-h{m.hidden_size}-l{m.num_hidden_layers}-v{m.vocab_size}-s{m.seed}"
                f"-n{self.num_tasks}-d{self.seed}-g{self.min_side}x{self.max_side}"
                f"-st{self.steps}-lr{self.learning_rate:g}-b{self.batch_size}")


def arc_lite_warm_model(
    settings: ArcLiteSettings = ArcLiteSettings(), output_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Path:
    """The warm-started tiny model for arc-lite (digits encoder, default prompt template), cached
    under ``fp16rl_home()/models/<settings.name>`` and built on first use; or built at ``output_dir``."""
    path = Path(output_dir) if output_dir is not None else fp16rl_home() / "models" / settings.name
    if output_dir is None and (path / "config.json").is_file():
        return path
    base = tiny_model_path(settings.model)
    tasks, programs = generate_tasks(settings.num_tasks, settings.seed, settings.min_side, settings.max_side)
    pairs = list(sft_pairs(tasks, programs, load_tokenizer(base), DigitEncoder()))
    return warm_start(base, pairs, path, settings.steps, settings.learning_rate, settings.batch_size, settings.seed,
                      show_progress)


# The RL tasks of the demo, held out from the warm start (another seed). Seed 11's first four
# tasks are geometric rules (flip left-right twice, a rotation, identity) that the warm model
# solves in a few percent of its samples (3-12% in the first steps), so a short run has rewards to
# select from and room to rise; rules with colour parameters are solved too rarely for 20 steps.
ARC_LITE_RL_TASKS = 4
ARC_LITE_RL_SEED = 11


def arc_lite_dataset(
    num_tasks: int = ARC_LITE_RL_TASKS, seed: int = ARC_LITE_RL_SEED, min_side: int = 3, max_side: int = 5
) -> Path:
    """An arc-lite task map (``.json.gz`` plus its programs side file), cached under
    ``fp16rl_home()/data`` and written on first use."""
    folder = fp16rl_home() / "data" / f"arc-lite-n{num_tasks}-s{seed}-g{min_side}x{max_side}"
    path = folder / "arc-lite.json.gz"
    if not path.is_file():
        with atomic_directory(folder) as tmp:
            write_synthetic(tmp / path.name, num_tasks, seed, min_side, max_side)
    return path


# TrainConfig options of the arc-lite demo run (with the two paths above): fp16 on both sides,
# full fine-tuning, no KL, every task of the dataset in every step (4 prompts x 8 completions).
ARC_LITE_RL_OPTIONS: dict[str, Any] = dict(
    reward_name="arc-v2-no-pixel-score",
    grid_encoder="digits",
    use_data_augmentation=False,  # the same four prompts every step: the short run learns them
    dtype="float16",
    lora_r=0,
    learning_rate=1e-3,
    max_grad_norm=1.0,
    warmup_ratio=0.0,
    beta=0.0,
    num_generations=8,
    prompts_per_step=4,
    max_completion_length=192,  # reference programs take <= 165 tokens
    mask_truncated_completions=True,
    temperature=1.0,
    top_p=1.0,
    n_jobs=2,
    max_steps=20,
)
