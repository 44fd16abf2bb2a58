"""Metrics and samples as a TRL user reads them (issue 27, part 5): ``reward/<fn>/std`` beside the mean
(TRL's ``nanstd``), and the completions table: every completion of a logged step in samples/ with its own
prompt, each function's score and its advantage, and the same table as each tracker shows it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fp16rl import TrainConfig
from fp16rl.algo.batch import RolloutBatch
from fp16rl.api import train
from fp16rl.core.scores import Scores
from fp16rl.runs.tracking import read_metrics
from fp16rl.tasks.base import PromptItem
from fp16rl.training.completions import CompletionRows, completion_records, completions_table, markdown_table
from fp16rl.training.dpo_step import OnlineDpo
from fp16rl.training.outcomes import reward_stats
from fp16rl.training.ppo_step import Ppo

ROWS = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
GENERATIONS, PROMPTS = 4, 2
TINY = dict(model_path="tiny", dtype="float32", lora_r=0, num_generations=GENERATIONS, prompts_per_step=PROMPTS,
            max_completion_length=6, max_seq_length=128, beta=0.0, learning_rate=1e-3, save_samples_steps=1,
            mask_truncated_completions=False)


def length_score(completions, **kwargs):
    """A score of the completion alone: its length modulo 5 (varied within a group)."""
    return [float(len(c) % 5) for c in completions]


def answer_seen(prompts, completions, answer, **kwargs):
    """A score of the prompt and the completion; None (not applicable) for prompts of odd answers' rows."""
    return [None if int(a) % 4 == 2 else float(a in c) + len(p) / 100 + len(c) % 2 for p, c, a in
            zip(prompts, completions, answer)]


def _expected_scores(prompt: str, completion: str) -> dict[str, float | None]:
    answer = next(r["answer"] for r in ROWS if r["prompt"] == prompt)
    return {"length_score": float(len(completion) % 5),
            "answer_seen": None if int(answer) % 4 == 2 else float(answer in completion) + len(prompt) / 100
            + len(completion) % 2}


def _samples(run: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trl_metrics") / "run"
    train(TrainConfig(**TINY, max_steps=2, output_dir=str(folder), reward_weights=[1.0, 2.0]), dataset=ROWS,
          reward_funcs=[length_score, answer_seen])
    return folder


def test_each_function_logs_its_std_beside_its_mean_as_numpy_computes_them(run):
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        samples = _samples(run, record["step"])
        for name in ("length_score", "answer_seen"):
            scored = [s["rewards"][name] for s in samples if s["rewards"][name] is not None]
            assert record[f"reward/{name}/mean"] == pytest.approx(np.mean(scored), abs=1e-12)
            if len(scored) > 1:
                assert record[f"reward/{name}/std"] == pytest.approx(np.std(scored, ddof=1), abs=1e-12)
            else:
                assert math.isnan(record[f"reward/{name}/std"])  # TRL's nanstd: NaN under two values
        assert record["reward/std"] == pytest.approx(np.std([s["reward"] for s in samples], ddof=1), abs=1e-6)


def test_every_completion_has_its_own_prompt_scores_and_group_advantage(run):
    for step in (1, 2):
        samples = _samples(run, step)
        assert len(samples) == PROMPTS * GENERATIONS
        groups = [samples[g * GENERATIONS:(g + 1) * GENERATIONS] for g in range(PROMPTS)]
        assert len({group[0]["prompt"] for group in groups}) == PROMPTS  # not only the first prompt
        for group in groups:
            assert len({(s["uid"], s["prompt"]) for s in group}) == 1
            for sample in group:
                assert sample["rewards"] == _expected_scores(sample["prompt"], sample["completion"])
                weighted = sample["rewards"]["length_score"] + 2.0 * (sample["rewards"]["answer_seen"] or 0.0)
                assert sample["reward"] == pytest.approx(weighted, abs=1e-9)
            rewards = np.array([s["reward"] for s in group])
            expected = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)  # TRL's group advantage
            assert [s["advantage"] for s in group] == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_stats_exclude_the_rows_a_function_did_not_score():
    scores = Scores(rewards=[0.0] * 4, components={"f": [1.0, math.nan, 3.0, 5.0], "g": [math.nan, 2.0, math.nan,
                                                                                        math.nan],
                                                   "h": [math.nan] * 4})
    stats = reward_stats(scores)
    assert stats["reward/f/mean"] == 3.0 and stats["reward/f/std"] == pytest.approx(2.0)  # sqrt(8 / 2)
    assert stats["reward/g/mean"] == 2.0 and math.isnan(stats["reward/g/std"])
    assert math.isnan(stats["reward/h/mean"]) and math.isnan(stats["reward/h/std"])


def test_ppo_logs_the_mean_advantage_over_loss_tokens_and_online_dpo_none():
    config = TrainConfig(**{**TINY, "algorithm": "ppo"})
    advantages = torch.tensor([[1.0, 3.0, 7.0], [2.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    batch = RolloutBatch(tokens=None, advantages=advantages, loss_mask=mask, old_logprobs=torch.zeros(3, 3))
    means = Ppo(config).sample_advantages(batch)
    assert means[:2] == [2.0, 2.0] and math.isnan(means[2])  # no loss token: no advantage
    assert OnlineDpo(TrainConfig(**{**TINY, "algorithm": "online_dpo"})).sample_advantages(batch) is None
    items = [PromptItem("p", "u")] * 3
    rows = CompletionRows(items, ["a", "b", "c"], ["stop"] * 3, Scores([1.0, 0.0, 0.5], {"f": [1.0, math.nan, 0.5]}),
                          means)
    records = completion_records(rows)
    assert [r["advantage"] for r in records] == [2.0, 2.0, None] and records[1]["rewards"] == {"f": None}


def test_the_trackers_table_has_trls_columns_and_the_scalar_details():
    records = [{"uid": "u", "prompt": "2 | 2?", "completion": "a\nb", "rewards": {"f": 1.0, "g": None}, "reward": 1.0,
                "advantage": 0.5, "finish_reason": "stop", "details": {"gold": "4", "grid": [[1]], "f": 3}},
               {"uid": "u", "prompt": "2 | 2?", "completion": "c", "rewards": {"f": 0.0, "g": 2.0}, "reward": 2.0,
                "advantage": -0.5, "finish_reason": "length", "details": {"gold": "4", "grid": [[2]], "f": 3}}]
    columns, data = completions_table(7, records)
    assert columns == ["step", "prompt", "completion", "f", "g", "gold", "advantage"]  # nested and clashing: not
    assert data[0] == [7, "2 | 2?", "a\nb", 1.0, None, "4", 0.5]
    text = markdown_table(columns, data).splitlines()
    assert text[0] == "| step | prompt | completion | f | g | gold | advantage |" and len(text) == 4
    assert text[2] == "| 7 | 2 \\| 2? | a<br>b | 1 |  | 4 | 0.5 |"
