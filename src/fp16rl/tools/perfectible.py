"""``fp16rl data perfectible``: the paper's sanity test as a dataset filter.

Sample every problem ``--samples`` times with the real sampler (in ``--dtype``) and keep those the
model solves in a band of pass rates (``--keep 0.2,0.8``): hard enough to learn from, easy enough to
be learnable. On such a set a sound algorithm should reach ~100% training reward; a run that does
not is unhealthy (the paper's test). Deterministic: sample ``j`` of row ``r`` draws the noise of
(``--seed``, ``r``, ``j``), whatever the batching. Resumable: each evaluated row is appended (fsync'ed)
to ``<output>.partial``, which a re-run with the same settings continues; the output is written
atomically at the end, with the dataset's columns plus ``pass_rate``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fp16rl.config.options import TrainConfig, opt, train_option
from fp16rl.core.errors import ConfigError


@dataclass
class PerfectibleSettings:
    """Options of ``fp16rl data perfectible`` (shared ones mean what they mean in ``train``)."""

    model_path: str = field(metadata={"help": "HF model folder, a prepared model name, or 'tiny'."})
    dataset_path: str = field(metadata={"help": "A prompt dataset (.jsonl, .json, .parquet, .csv, a save_to_disk folder) or reasoning-gym:<name>."})
    output: str = field(metadata={"help": "The JSONL file to write (never overwritten); train reads it as --dataset-path."})
    reward_funcs: list[str] = train_option("reward_funcs")
    reward_weights: list[float] = train_option("reward_weights")
    samples: int = opt(8, "Completions sampled per problem.")
    keep: tuple[float, ...] = opt((0.2, 0.8), "Pass-rate band to keep, LOW,HIGH inclusive.")
    solved_threshold: float = opt(1.0, "A completion solves its problem when its reward is at least this.")
    batch_prompts: int = opt(8, "Problems decoded together (x --samples rows); no effect on the results.")
    dtype: str = train_option("dtype")
    max_completion_length: int = train_option("max_completion_length")
    max_seq_length: int = train_option("max_seq_length")
    temperature: float = train_option("temperature")
    top_p: float = train_option("top_p")
    seed: int = train_option("seed")
    prompt_column: str | None = train_option("prompt_column")
    system_prompt: str | None = train_option("system_prompt")
    dataset_size: int | None = train_option("dataset_size")
    dataset_seed: int | None = train_option("dataset_seed")
    sampler_engine: str = train_option("sampler_engine")
    device: str = train_option("device")

    def train_config(self) -> TrainConfig:
        """The same options as a TrainConfig, validated by its one set of checks."""
        shared = {name: getattr(self, name) for name in (
            "model_path", "dataset_path", "reward_funcs", "reward_weights", "dtype", "max_completion_length",
            "max_seq_length", "temperature", "top_p", "seed", "prompt_column", "system_prompt", "dataset_size",
            "dataset_seed", "sampler_engine", "device")}
        config = TrainConfig(**shared, num_generations=max(self.samples, 2), output_dir=self.output)
        config.validate()
        if self.samples < 1 or self.batch_prompts < 1:
            raise ConfigError("--samples and --batch-prompts must be >= 1")
        if len(self.keep) != 2 or not 0 <= self.keep[0] <= self.keep[1] <= 1:
            raise ConfigError(f"--keep must be LOW,HIGH with 0 <= LOW <= HIGH <= 1, got {self.keep}")
        if not math.isfinite(self.solved_threshold):  # a NaN threshold would count nothing as solved
            raise ConfigError(f"--solved-threshold must be a finite number, got {self.solved_threshold}")
        if not self.output.endswith(".jsonl"):
            raise ConfigError(f"--output {self.output}: write a .jsonl file (train reads it as --dataset-path)")
        return config


def run_perfectible(settings: PerfectibleSettings, show_progress: bool = False) -> dict[str, Any]:
    """Evaluate every row (resuming ``<output>.partial``), write the kept rows; return a summary."""
    from fp16rl.model.loading import load_model, load_tokenizer, model_folder, resolve_device, stop_token_ids
    from fp16rl.model.precision import parse_dtype
    from fp16rl.tasks.checks import check_dataset
    from fp16rl.rollout.sampler import Sampler, SamplingParams
    from fp16rl.tasks import make_task
    from fp16rl.tasks.dataset import PromptDatasetTask
    from fp16rl.runs.tracking import Progress

    config = settings.train_config()
    output = Path(settings.output)
    if output.exists():
        raise ConfigError(f"--output {output} exists; choose another file (results are never overwritten)")
    check_dataset(config)
    path = model_folder(config.model_path)
    tokenizer = load_tokenizer(path)
    task = make_task(config, tokenizer)
    if not isinstance(task, PromptDatasetTask):
        raise ConfigError(f"--dataset-path {config.dataset_path}: perfectible filters prompt datasets "
                          "(files or reasoning-gym:<name>), not ARC or toy tasks")
    fingerprint = {k: v for k, v in asdict(settings).items() if k not in ("output", "batch_prompts", "device")}
    partial = output.with_name(output.name + ".partial")
    done = _read_partial(partial, fingerprint)
    todo = [row for row in range(len(task.dataset)) if row not in done]
    if todo:
        model = load_model(path, device=resolve_device(config.device)).eval()
        sampler = Sampler(model, parse_dtype(config.dtype), tokenizer.pad_token_id, stop_token_ids(model, tokenizer),
                          engine=config.sampler_engine)
        params = SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                top_p=config.top_p)
        with Progress("perfectible", len(task.dataset), len(done), enabled=show_progress, unit="problem") as bar, \
                partial.open("a") as log:
            if not done:
                _append(log, {"settings": fingerprint})
            for begin in range(0, len(todo), settings.batch_prompts):
                for record in _evaluate(task, sampler, params, settings, todo[begin: begin + settings.batch_prompts]):
                    done[record["row"]] = record
                    _append(log, record)
                bar.update(completed=len(done), description=f"kept so far {_kept(done, settings)}")
    kept = sorted(row for row, record in done.items() if _in_band(record, settings))
    from fp16rl.core.atomic import atomic_write_text
    from fp16rl.runs.tracking import jsonable

    lines = [json.dumps(jsonable({**task.dataset[row], "pass_rate": done[row]["pass_rate"]}), ensure_ascii=False)
             for row in kept]
    atomic_write_text(output, "".join(line + "\n" for line in lines))
    partial.unlink()
    skipped = sum("skipped" in record for record in done.values())
    return {"rows": len(done), "kept": len(kept), "skipped_long_prompts": skipped, "output": str(output)}


def _evaluate(task: Any, sampler: Any, params: Any, settings: PerfectibleSettings, rows: list[int]) -> list[dict]:
    """Pass rates of ``rows``: sample, score, count completions with reward >= the threshold."""
    from fp16rl.core.seeds import derived_seed
    from fp16rl.tasks.base import PromptItem, count_tokens, encode_text

    budget = task.max_prompt_tokens
    records, items = [], []
    for row in rows:
        text = task.render(task.dataset[row][task.prompt_column])
        if budget is not None and count_tokens(task.tokenizer, text) > budget:
            records.append({"row": row, "pass_rate": None, "skipped": "prompt longer than the budget"})
        else:
            items.append(PromptItem(text=text, uid=f"row-{row}", meta={"row": row, "skipped_long_prompts": 0}))
    if items:
        k = settings.samples
        rollouts = sampler.generate([encode_text(task.tokenizer, i.text) for i in items], k, params,
                                    seed=derived_seed(settings.seed), slots=[i.meta["row"] for i in items])
        token_lists = rollouts.completion_lists()
        completions = task.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        grouped = [item for item in items for _ in range(k)]
        rewards = task.score(grouped, completions, rollouts.truncated, token_lists).rewards
        for i, item in enumerate(items):
            mine = rewards[i * k:(i + 1) * k]
            records.append({"row": item.meta["row"], "rewards": mine,
                            "pass_rate": sum(r >= settings.solved_threshold for r in mine) / k})
    return records


def _in_band(record: dict[str, Any], settings: PerfectibleSettings) -> bool:
    rate = record.get("pass_rate")
    return rate is not None and settings.keep[0] <= rate <= settings.keep[1]


def _kept(done: dict[int, dict], settings: PerfectibleSettings) -> int:
    return sum(_in_band(record, settings) for record in done.values())


def _append(log: Any, record: dict[str, Any]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def _read_partial(partial: Path, fingerprint: dict[str, Any]) -> dict[int, dict]:
    """Rows already evaluated by an interrupted run with the same settings (a torn last line is dropped)."""
    if not partial.exists():
        return {}
    lines = partial.read_text().split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or json.loads(json.dumps(header.get("settings"))) != json.loads(
            json.dumps(fingerprint)):
        raise ConfigError(f"{partial} was written with other settings; remove it or use them again")
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        done[int(record["row"])] = record
    return done
