"""Any prompt dataset as a workload: rows of prompts plus columns, scored by reward functions.

Files are read through the ``datasets`` library (JSON Lines, JSON, Parquet, CSV, or a folder written
by ``save_to_disk``), memory-mapped Arrow tables, so a million-row file does not sit in RAM; nothing
is downloaded. Prompts are fed as TRL's GRPOTrainer feeds them: a string as it is (no chat template), a
list of chat messages through the model's chat template (refused when it has none); ``--system-prompt``
is put first as a system turn, which makes a string prompt a conversation. Every other column reaches
the reward functions as a keyword argument, except ``completion`` and ``completion_ids`` (TRL drops them).

Order: prompt slot ``s`` of step ``t`` sits at position ``p = t * n + s``; epoch ``p // N`` visits the
``N`` rows in the order ``default_rng([seed, epoch]).permutation(N)``. A prompt longer than the budget
is skipped for the next position's row and counted (``data/skipped_long_prompts``), as for ARC. So
``batch(step, n)`` is a pure function of the seed and the step: resume needs only the step and arms
with the same seed see identical prompts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fp16rl.core.errors import ConfigError, DatasetError
from fp16rl.core.scores import Scores
from fp16rl.tasks.base import (PromptItem, RunProgress, chat_template_missing, count_tokens, has_chat_template,
                               render_prompt)
from fp16rl.tasks.data_files import invalid_table_problem, text_file_problem
from fp16rl.tasks.reward_calls import CALL_KEYWORDS, DROPPED_COLUMNS, trainer_state
from fp16rl.tasks.rewards import RewardSet

DATASET_KINDS = ("JSON Lines (.jsonl)", "JSON (.json, a list of records)", "Parquet (.parquet)", "CSV (.csv)",
                 "a folder written by datasets' save_to_disk", "reasoning-gym:<name>")
_LOADERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_CONSECUTIVE_LONG = 64


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the hub
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become ours: one line, named file
    return datasets


def load_prompt_file(spec: str, cache_dir: Path) -> Any:
    """A ``datasets.Dataset`` from a local file or ``save_to_disk`` folder; errors name the file."""
    datasets = _datasets()
    path = Path(spec).expanduser()
    kinds = "; ".join(DATASET_KINDS)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DatasetError(f"--dataset-path {path} is a folder but not one written by save_to_disk; "
                               f"--dataset-path accepts: {kinds}")
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DatasetError(f"{path}: cannot read the saved dataset: {_first_line(err)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DatasetError(f"{path} holds the splits {', '.join(loaded)}, none named 'train'")
            loaded = loaded["train"]
        return _valid_text(loaded, path, None)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None or (path.suffix == ".gz" and not path.name.endswith((".json.gz", ".jsonl.gz"))):
        raise DatasetError(f"--dataset-path {path}: unknown kind of file; --dataset-path accepts: {kinds}")
    try:
        loaded = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=str(cache_dir))
    except Exception as err:  # pyarrow and datasets raise many types for a malformed file
        problem = text_file_problem(path, loader) or f"cannot read it as {loader}: {_first_line(err)}"
        raise DatasetError(f"{path}: {problem}") from None
    return _valid_text(loaded, path, loader)


def _valid_text(dataset: Any, path: Path, loader: str | None) -> Any:
    """``dataset`` if its strings are UTF-8; else ``DatasetError`` naming the line (text files) or the row."""
    problem = invalid_table_problem(dataset.data.table)
    if problem is None:
        return dataset
    raise DatasetError(f"{path}: {text_file_problem(path, loader) or problem}")


def given_dataset(dataset: Any) -> Any:
    """The dataset a Python caller passed (``train(dataset=...)``, TRL's ``train_dataset``) as a
    ``datasets.Dataset``: one as it is, a list of dicts converted; anything else refused by name."""
    datasets = _datasets()
    if isinstance(dataset, (list, tuple)):
        return dataset_from_rows(dataset)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DatasetError(f"the dataset passed is a DatasetDict with the splits {', '.join(map(str, dataset))}; "
                           "pass one of them, e.g. dataset['train']")
    if not isinstance(dataset, datasets.Dataset):
        raise DatasetError(f"the dataset passed must be a datasets.Dataset or a list of dicts, got "
                           f"{type(dataset).__name__}")
    return dataset


def dataset_from_rows(rows: Sequence[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` from a list of dicts (the Python API)."""
    datasets = _datasets()
    if not rows:
        raise DatasetError("the dataset holds no rows")
    try:
        return datasets.Dataset.from_list(list(rows))
    except Exception as err:
        raise DatasetError(f"the dataset's rows do not form one table: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """The message of the error that says what is wrong (datasets wraps the reader's in its own)."""
    while type(err).__name__ == "DatasetGenerationError" and err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_prompt_column(dataset: Any, column: str, source: str) -> bool:
    """Raise ``DatasetError`` naming the file, row and column of the first unusable prompt; return True
    for conversational prompts (lists of ``{"role", "content"}`` messages), False for text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(dataset) == 0:
        raise DatasetError(f"{source} holds no rows")
    if column not in dataset.column_names:
        raise DatasetError(f"{source}: no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                           "name the prompt column with --prompt-column")
    values = dataset.data.column(column)
    kind = values.type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    chat = ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)
            and {"role", "content"} <= {kind.value_type.field(i).name for i in range(kind.value_type.num_fields)})
    if not (text or chat):
        raise DatasetError(f"{source}, column {column!r}: holds {kind}, expected text or a list of chat messages "
                           "with 'role' and 'content'")
    bad = pc.is_null(values)
    if text:
        bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.fill_null(values, "")), 0))
    else:
        bad = pc.or_(bad, pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0))
        messages = pc.list_flatten(values)
        broken = pc.or_(pc.is_null(pc.struct_field(messages, "role")), pc.is_null(pc.struct_field(messages, "content")))
        if pc.any(broken).as_py():
            owners = pc.list_parent_indices(values).to_numpy()
            raise DatasetError(f"{source}, row {int(owners[np.flatnonzero(broken.to_numpy(zero_copy_only=False))[0]])}, "
                               f"column {column!r}: a message without role or content")
    bad_rows = np.flatnonzero(bad.to_numpy(zero_copy_only=False)) if pc.any(bad).as_py() else []
    if len(bad_rows):
        raise DatasetError(f"{source}, row {int(bad_rows[0])}, column {column!r}: empty or missing prompt")
    return bool(chat)


@dataclass
class PromptData:
    """A prompt dataset, checked, with its reward functions: everything a prompt task needs but the
    tokenizer, so ``runs.plan_run`` can build it (and refuse bad input) before torch is loaded."""

    dataset: Any
    source: str
    prompt_column: str
    conversational: bool
    system_prompt: str | None
    rewards: RewardSet

    @property
    def columns(self) -> list[str]:
        """The columns reward functions get as keywords: all but the prompt's (it comes as ``prompts``) and
        those TRL drops."""
        return [c for c in self.dataset.column_names if c != self.prompt_column and c not in DROPPED_COLUMNS]


def prompt_data(config: Any, dataset: Any = None, reward_funcs: Sequence[Any] | None = None) -> PromptData:
    """Load and check the dataset ``config`` names (or ``dataset`` from the Python API), load the
    reward functions and check that each can take the keywords it will get (none is called here)."""
    from fp16rl.config.options import PROCEDURAL_PREFIX
    from fp16rl.core.paths import fp16rl_home

    default_rewards: list[str] = []
    system_prompt = config.system_prompt
    if dataset is not None:
        source = "the dataset passed to train()"
        dataset = given_dataset(dataset)
    elif config.dataset_path.startswith(PROCEDURAL_PREFIX):
        from fp16rl.tasks import gym

        source = config.dataset_path
        rows = gym.gym_rows(source.removeprefix(PROCEDURAL_PREFIX), config.dataset_size or gym.DEFAULT_SIZE,
                            config.dataset_seed or 0, system_prompt)
        dataset, system_prompt, default_rewards = dataset_from_rows(rows), None, ["reasoning_gym"]
    else:
        source = config.dataset_path
        dataset = load_prompt_file(source, fp16rl_home() / "datasets")
    column = config.prompt_column or "prompt"
    conversational = check_prompt_column(dataset, column, source)
    functions = list(reward_funcs or config.reward_funcs or ([config.reward_name] if config.reward_name else [])
                     or default_rewards)
    rewards = RewardSet.build(functions, config.reward_weights, config.reward_on_error, config)
    data = PromptData(dataset, source, column, conversational, system_prompt, rewards)
    taken = [name for name in data.columns if name in CALL_KEYWORDS]
    if taken:
        raise DatasetError(f"{source}: the column {taken[0]!r} has the name of an argument reward functions get from "
                           f"the trainer ({', '.join(CALL_KEYWORDS)}); rename it")
    rewards.check_signatures(data.columns)
    return data


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """Row indices in the order epoch ``epoch`` visits them."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class PromptDatasetTask:
    """A prompt dataset and its reward functions behind the :class:`~fp16rl.tasks.base.Task` protocol."""

    name = "dataset"

    def __init__(self, data: PromptData, tokenizer: Any, *, seed: int = 0, max_prompt_tokens: int | None = None,
                 prompts_per_step: int = 1):
        self.dataset, self.source, self.rewards = data.dataset, data.source, data.rewards
        self.prompt_column, self.conversational = data.prompt_column, data.conversational
        self.system_prompt, self.columns = data.system_prompt or None, data.columns
        self.tokenizer, self.seed = tokenizer, seed
        self.max_prompt_tokens, self.prompts_per_step = max_prompt_tokens, prompts_per_step
        if (self.conversational or self.system_prompt is not None) and not has_chat_template(tokenizer):
            raise ConfigError(f"{self.source}: {chat_template_missing(not self.conversational)}")

    @property
    def num_steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.prompts_per_step)

    def row_at(self, position: int) -> tuple[int, int]:
        """(dataset row, epoch) at a position of the data stream."""
        epoch, index = divmod(position, len(self.dataset))
        return int(epoch_order(self.seed, epoch, len(self.dataset))[index]), epoch

    def render(self, prompt: Any) -> str:
        """The text the sampler continues for a dataset prompt (:func:`~fp16rl.tasks.base.render_prompt`)."""
        return render_prompt(list(prompt) if self.conversational else str(prompt), self.tokenizer, self.system_prompt)

    def batch(self, step: int, num_prompts: int) -> list[PromptItem]:
        """Prompts of ``step``: a pure function of (seed, step, num_prompts)."""
        return [self._prompt(step, slot, step * num_prompts + slot) for slot in range(num_prompts)]

    def _prompt(self, step: int, slot: int, position: int) -> PromptItem:
        lengths: list[int] = []
        for skipped in range(MAX_CONSECUTIVE_LONG):
            row, epoch = self.row_at(position + skipped)
            text = self.render(self.dataset[row][self.prompt_column])
            if self.max_prompt_tokens is not None:
                lengths.append(count_tokens(self.tokenizer, text))
                if lengths[-1] > self.max_prompt_tokens:
                    continue
            return PromptItem(text=text, uid=f"row-{row}/{self.seed}.{step}.{slot}",
                              meta={"row": row, "epoch": epoch, "skipped_long_prompts": skipped})
        raise DatasetError(f"{self.source}: {MAX_CONSECUTIVE_LONG} consecutive prompts exceed the prompt budget of "
                           f"{self.max_prompt_tokens} tokens (shortest {min(lengths)}); raise --max-seq-length")

    def score(self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool],
              completion_ids: Sequence[list[int]] | None = None, progress: RunProgress | None = None) -> Scores:
        """The reward functions' scores; they get the dataset's prompts and columns, and ``progress`` as a
        ``trainer_state`` (``epoch`` counted in this dataset's steps per epoch)."""
        rows = [item.meta["row"] for item in items]
        records = {row: self.dataset[row] for row in set(rows)}
        prompts = [records[row][self.prompt_column] for row in rows]
        shaped = [[{"role": "assistant", "content": c}] if self.conversational else c for c in completions]
        columns = {name: [records[row][name] for row in rows] for name in self.columns}
        ids = [list(t) for t in completion_ids] if completion_ids is not None else [[] for _ in completions]
        scores = self.rewards(prompts, shaped, ids, columns, rows, trainer_state(progress, self.num_steps_per_epoch))
        skips = {item.uid: item.meta["skipped_long_prompts"] for item in items}
        scores.counts["data/skipped_long_prompts"] = float(sum(skips.values()))
        return scores

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.source, "rows": len(self.dataset), "prompt_column": self.prompt_column,
                "conversational": self.conversational, "columns": self.columns, "reward_functions": self.rewards.names,
                "reward_weights": self.rewards.weights}

    def close(self) -> None:
        self.rewards.close()
