"""ArcTask: prompts as a pure function of (seed, step), long-prompt skipping, scoring in the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fp16rl.tasks.arc.augment import augmentation_for
from fp16rl.tasks.arc.data import load_dataset
from fp16rl.tasks.arc.prompts import DEFAULT_ASSISTANT_PREFIX, PromptTemplate
from fp16rl.tasks.arc.synthetic import write_synthetic
from fp16rl.tasks.arc.task import ArcTask, ArcTaskSettings
from fp16rl.tasks.base import Task

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if not loop.last %}<|end|>\n{% endif %}{% endfor %}"
)
TILE = "import numpy as np\n\ndef transform(grid):\n    return np.tile(np.array(grid), (2, 2)).tolist()\n"


def _tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A real HF fast tokenizer: one token per word or punctuation mark (every word is [UNK])."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = write_synthetic(tmp_path_factory.mktemp("lite") / "lite.json.gz", num_tasks=12, seed=0)
    return path


def _tile_dataset(path: Path) -> Path:
    """Tasks whose rule (tile 2x2) commutes with every augmentation, plus one task with big grids."""
    def pair(g):
        return {"input": g, "output": [r + r for r in g] * 2}

    tasks = {
        f"tile{i}": {"train": [pair([[i, 1], [2, 3]]), pair([[4, i, 5]])], "test": [pair([[i], [7]])]}
        for i in range(4)
    }
    tasks["huge"] = {"train": [pair([[1] * 14] * 14)], "test": [pair([[2] * 14] * 14)]}
    path.write_text(json.dumps(tasks))
    return path


def _snapshot(items) -> list:
    return [(i.text, i.uid, i.meta) for i in items]


def test_is_a_task_and_counts_steps(lite: Path) -> None:
    task = ArcTask(lite, _tokenizer(), ArcTaskSettings(prompts_per_step=5))
    assert isinstance(task, Task)
    assert task.num_steps_per_epoch == 3


def test_batch_is_a_pure_function_of_seed_and_step(lite: Path) -> None:
    tok = _tokenizer()
    run = ArcTask(lite, tok, ArcTaskSettings(seed=4))
    full = [_snapshot(run.batch(step, 3)) for step in range(6)]
    resumed = ArcTask(lite, tok, ArcTaskSettings(seed=4, reward_name="arc-v1"))  # another arm, resumed at step 4
    assert _snapshot(resumed.batch(4, 3)) == full[4]
    assert _snapshot(resumed.batch(1, 3)) == full[1]
    other = ArcTask(lite, tok, ArcTaskSettings(seed=5))
    assert _snapshot(other.batch(4, 3)) != full[4]


def test_epochs_visit_every_task_once_in_seeded_orders(lite: Path) -> None:
    task = ArcTask(lite, None, ArcTaskSettings(augment=False))
    n = len(task.task_ids)
    epoch0 = [task.batch(s, 1)[0].meta["task_id"] for s in range(n)]
    epoch1 = [task.batch(s, 1)[0].meta["task_id"] for s in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == task.task_ids
    assert epoch0 != epoch1
    assert [i.meta["task_id"] for i in task.batch(1, 4)] == epoch0[4:8]


def test_augmentation_applies_to_prompt_and_scoring_grids(lite: Path) -> None:
    raw = load_dataset(lite).tasks
    aug_task = ArcTask(lite, _tokenizer(), ArcTaskSettings(seed=2))
    item = aug_task.batch(3, 2)[1]
    aug = augmentation_for(2, 3, 1)
    assert item.meta["train"] == aug.apply_task(raw[item.meta["task_id"]])["train"]
    assert item.meta["augmentation"] == aug.describe()
    plain = ArcTask(lite, _tokenizer(), ArcTaskSettings(seed=2, augment=False)).batch(3, 2)[1]
    assert plain.meta["train"] == raw[plain.meta["task_id"]]["train"]


def test_prompt_rendering_with_and_without_chat_template(lite: Path) -> None:
    item = ArcTask(lite, _tokenizer(), ArcTaskSettings(augment=False)).batch(0, 1)[0]
    assert item.text.startswith("<|system|>\nYou are a world-class puzzle solver")
    assert "## Example 1\n\nInput:\n" in item.text and "## Test input" in item.text
    assert item.text.endswith("<|assistant|>\n" + DEFAULT_ASSISTANT_PREFIX)
    plain = ArcTask(lite, _tokenizer(chat=False), ArcTaskSettings(augment=False)).batch(0, 1)[0]
    assert plain.text.startswith("System: ") and "\n\nAssistant: " + DEFAULT_ASSISTANT_PREFIX in plain.text
    custom = PromptTemplate(system="S", user="Solve:\n{examples}Test:\n{test_input}", assistant_prefix="Code:")
    text = ArcTask(lite, None, ArcTaskSettings(augment=False, encoder="digits", template=custom)).batch(0, 1)[0].text
    assert text.startswith("System: S\n\nUser: Solve:\n") and text.endswith("Assistant: Code:")
    with pytest.raises(ValueError, match="lacks placeholders"):
        PromptTemplate(user="no grids here")


def test_long_prompts_are_skipped_and_counted(tmp_path: Path) -> None:
    path = _tile_dataset(tmp_path / "tile.json")
    tok = _tokenizer()
    task = ArcTask(path, tok, ArcTaskSettings(augment=False, max_prompt_tokens=600))
    stream = [task.batch(s, 1)[0] for s in range(2 * len(task.task_ids))]
    assert all(i.meta["task_id"] != "huge" for i in stream)
    skipped = [i for i in stream if i.meta["skipped_long_prompts"]]
    assert len(skipped) == 2  # once per epoch
    scores = task.score([skipped[0]] * 2, ["no code", "no code"], [False, False])
    assert scores.counts["data/skipped_long_prompts"] == 1.0  # the repeated prompt counts once
    with pytest.raises(ValueError, match="consecutive prompts exceed max_prompt_tokens=5"):
        ArcTask(path, tok, ArcTaskSettings(max_prompt_tokens=5)).batch(0, 1)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ArcTask(path, None, ArcTaskSettings(max_prompt_tokens=5))


def test_score_runs_completions_on_augmented_grids(tmp_path: Path) -> None:
    path = _tile_dataset(tmp_path / "tile.json")
    task = ArcTask(path, None, ArcTaskSettings(seed=1, n_jobs=2, timeout_s=5.0))
    items = task.batch(0, 2)
    assert any(i.meta["augmentation"] != "rot0-c0123456789" for i in items)
    good = f"{DEFAULT_ASSISTANT_PREFIX}\n```python\n{TILE}```"
    completions = [good, "I have no idea.", "```python\ndef transform(grid):\n    return grid\n```", good]
    try:
        scores = task.score([items[0], items[0], items[1], items[1]], completions, [False, True, False, False])
        again = task.score(items[:1], [good], [False])  # the pool is reused across steps
        task.close()
        after_close = task.score(items[:1], [good], [False])  # and recreated on demand
    finally:
        task.close()
    assert scores.rewards[0] == 10.0 and scores.rewards[3] == 10.0
    assert scores.rewards[1] == 0.0 and 1.0 <= scores.rewards[2] < 10.0
    assert scores.components == {"arc-v2-no-pixel-score": scores.rewards}
    m = scores.metrics
    assert m["reward/solved_ratio"] == 0.5 and m["code/ok_ratio"] == 0.75 and m["code/parse_error_ratio"] == 0.25
    assert scores.counts["data/skipped_long_prompts"] == 0.0
    d = scores.details
    assert d[1]["outcome"] == "parse_error" and d[1]["truncated"] is True and d[0]["solved"]
    assert d[2]["train_correct"] == [False] * len(items[1].meta["train"]) and d[0]["uid"] == items[0].uid
    assert again.rewards == after_close.rewards == [10.0]
    with pytest.raises(ValueError, match="2 items, 1 completions"):
        task.score(items, ["x"], [False])


def test_bad_configuration_fails_at_construction(lite: Path) -> None:
    with pytest.raises(ValueError, match="unknown reward"):
        ArcTask(lite, None, ArcTaskSettings(reward_name="nope"))
    with pytest.raises(ValueError, match="unknown grid encoder"):
        ArcTask(lite, None, ArcTaskSettings(encoder="Hex()"))
    with pytest.raises(ValueError, match="seed"):
        ArcTask(lite, None, ArcTaskSettings(seed=-1))


def test_memory_limit_is_counted_as_its_own_outcome(lite: Path) -> None:
    task = ArcTask(lite, None, ArcTaskSettings(n_jobs=1, memory_limit_mb=1024))
    hog = "```python\ndef transform(grid):\n    hog = bytearray(2**33)\n    return grid\n```"
    items = task.batch(0, 1) * 2
    try:
        scores = task.score(items, [hog, "no code"], [False, False])
    finally:
        task.close()
    assert scores.details[0]["outcome"] == "memory_limit" and scores.rewards == [0.0, 0.0]
    assert scores.metrics["code/memory_limit_ratio"] == 0.5 and scores.metrics["code/parse_error_ratio"] == 0.5


def test_describe_records_dataset_and_sandbox_layers(lite: Path) -> None:
    task = ArcTask(lite, _tokenizer(), ArcTaskSettings(encoder="digits", n_jobs=1))
    try:
        info = task.describe()
    finally:
        task.close()
    assert info["num_tasks"] == 12 and info["reward"] == "arc-v2-no-pixel-score" and info["grid_encoder"]
    assert {"rlimits", "seccomp", "landlock"} <= set(info["sandbox_layers"])
    assert info["sandbox_layers"]["rlimits"] == "active"
