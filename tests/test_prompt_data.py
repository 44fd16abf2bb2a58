"""Your own data and rewards: prompt datasets in every format, TRL-style reward functions, the math and
reasoning-gym built-ins, the Python API, and pairing across arms."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest

from fp16rl import TrainConfig, train
from fp16rl.core.errors import UserError
from fp16rl.training.outcomes import reward_stats
from fp16rl.tasks.rewards import RewardError, RewardSet
from fp16rl.tasks import dataset_kind
from fp16rl.tasks.dataset import PromptDatasetTask, prompt_data
from fp16rl.tasks.math import math_format_reward, math_reward
from fp16rl.runs.tracking import read_metrics

ROWS = [{"prompt": f"What is {i} + {i}? Put the answer in \\boxed{{}}.", "answer": str(2 * i), "level": i % 3}
        for i in range(10)]
SMALL = dict(model_path="tiny", dtype="float32", lora_r=0, num_generations=4, prompts_per_step=2,
             max_completion_length=16, max_seq_length=256, max_steps=2, beta=0.0, learning_rate=1e-3)


def write_formats(folder: Path) -> dict[str, Path]:
    """The same rows as JSONL, JSON, Parquet, CSV and a save_to_disk folder."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "rows.json").write_text(json.dumps(ROWS))
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(folder / "rows.parquet"))
    table.to_csv(str(folder / "rows.csv"), index=False)
    table.save_to_disk(str(folder / "saved"))
    return {kind: folder / name for kind, name in (("jsonl", "rows.jsonl"), ("json", "rows.json"),
                                                    ("parquet", "rows.parquet"), ("csv", "rows.csv"),
                                                    ("saved", "saved"))}


def test_every_format_gives_the_same_rows_in_the_same_order(tmp_path, tiny_tokenizer):
    files = write_formats(tmp_path / "data")
    batches = {}
    for kind, path in files.items():
        assert dataset_kind(str(path)) == "prompts"
        config = TrainConfig(dataset_path=str(path), reward_funcs=["math"], seed=3)
        task = PromptDatasetTask(prompt_data(config), tiny_tokenizer, seed=3, prompts_per_step=4)
        batches[kind] = [[(item.meta["row"], item.text) for item in task.batch(step, 4)] for step in range(5)]
    assert all(batch == batches["jsonl"] for batch in batches.values())
    # An epoch (10 rows / 4 per step = 2.5 steps) visits every row once, in a seeded order.
    rows = [row for step in batches["jsonl"] for row, _ in step]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert rows[:10] != list(range(10))
    assert batches["jsonl"][0][0][1].startswith("What is")  # a text prompt is fed as it is, as in TRL


def test_columns_reach_the_reward_functions_trl_style(tmp_path):
    """Functions written for TRL's GRPOTrainer, as its documentation writes them, run unchanged."""
    module = tmp_path / "my_rewards.py"
    module.write_text('''
import re
SEEN = []

def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

def correct(prompts, completions, completion_ids, answer, level, **kwargs):
    SEEN.append({"prompts": prompts, "answer": answer, "level": level, "ids": completion_ids})
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]
''')
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    last = train(TrainConfig(dataset_path=str(data), output_dir=str(tmp_path / "run"), **SMALL,
                             reward_funcs=[f"{module}:reward_len", f"{module}:correct"], reward_weights=[0.01, 1.0]))
    import sys

    seen = sys.modules["fp16rl_user_rewards.my_rewards"].SEEN
    call = seen[-1]
    assert len(call["prompts"]) == 8 and call["prompts"][0].startswith("What is") and len(call["ids"]) == 8
    assert call["answer"][0] == str(2 * int(call["prompts"][0].split()[2])) and set(call["level"]) <= {0, 1, 2}
    assert {"reward/reward_len/mean", "reward/correct/mean"} <= set(last)
    # The combined reward is the weighted sum, as TRL's.
    assert last["reward/mean"] == pytest.approx(0.01 * last["reward/reward_len/mean"] + last["reward/correct/mean"],
                                                rel=1e-6)
    # Conversational prompts: completions come as [{"role": "assistant", "content": ...}].
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n" for r in ROWS))
    last = train(TrainConfig(dataset_path=str(chat), output_dir=str(tmp_path / "chat_run"), **SMALL,
                             reward_funcs=[f"{module}:format_reward_func"]))
    assert last["reward/format_reward_func/mean"] == 0.0  # ran on message lists without error


def test_resume_on_a_prompt_dataset_is_exact(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    options = {**SMALL, "dataset_path": str(data), "reward_funcs": ["math", "math_format"], "max_steps": 4,
               "save_steps": 2}
    train(TrainConfig(output_dir=str(tmp_path / "straight"), **options))
    train(TrainConfig(output_dir=str(tmp_path / "split"), **{**options, "max_steps": 2}))
    train(TrainConfig(output_dir=str(tmp_path / "split"), resume=True, **options))

    def comparable(run):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert comparable("split") == comparable("straight") and len(comparable("split")) == 4


def test_reward_set_combines_like_trl_and_reports_errors():
    def half(completions, **kwargs):
        return [0.5] * len(completions)

    def sometimes(completions, **kwargs):
        return [None if "skip" in c else 1.0 for c in completions]

    rewards = RewardSet.build([half, sometimes], [2.0, 1.0])
    scores = rewards(["p", "p"], ["a", "skip"], [[1], [2]], {}, [0, 1])
    assert scores.rewards == [2.0, 1.0]  # None counts 0 in the sum (nansum)
    assert scores.components["half"] == [0.5, 0.5] and scores.components["sometimes"][0] == 1.0
    assert math.isnan(scores.components["sometimes"][1])
    stats = reward_stats(scores)
    assert {k: v for k, v in stats.items() if k.endswith("/mean")} == {"reward/half/mean": 0.5,
                                                                      "reward/sometimes/mean": 1.0}  # scored rows
    assert stats["reward/half/std"] == 0.0 and math.isnan(stats["reward/sometimes/std"])  # one scored row: NaN

    def broken(completions, **kwargs):
        return [1.0, "x"][: len(completions)]

    with pytest.raises(RewardError, match=r"'broken' returned 'x' for dataset row 7 \(completion 1\)"):
        RewardSet.build([broken])(["p", "p"], ["a", "b"], [[], []], {}, [3, 7])
    def two(completions, **kwargs):
        return [0.0, 0.0]

    with pytest.raises(RewardError, match="'two' returned 2 values for 3 completions"):
        RewardSet.build([two])(["p"] * 3, ["a"] * 3, [[]] * 3, {}, [0, 1, 2])


def test_reward_errors_can_score_zero_and_count(tmp_path):
    def picky(completions, **kwargs):
        if any("bad" in c for c in completions):
            raise ValueError("cannot score that")
        return [1.0] * len(completions)

    rewards = RewardSet.build([picky], on_error="zero")
    scores = rewards(["p"] * 3, ["good", "bad", "good"], [[]] * 3, {}, [0, 1, 2])
    assert scores.rewards == [1.0, 0.0, 1.0] and scores.counts["reward/picky/errors"] == 1.0
    with pytest.raises(RewardError, match=r"'picky' raised ValueError: cannot score that \(on dataset rows 0, 1, 2\)"):
        RewardSet.build([picky])(["p"] * 3, ["good", "bad", "good"], [[]] * 3, {}, [0, 1, 2])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fp16rl" and r.levelno == logging.WARNING]


def test_rewards_that_are_all_none_are_announced_once(caplog):
    """TRL warns when every reward function returned None for a row; such a row scores 0 silently."""
    def nothing(completions, **kwargs):
        return [None] * len(completions)

    def some(completions, **kwargs):
        return [None if c == "skip" else 1.0 for c in completions]

    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        rewards = RewardSet.build([nothing])
        for _ in range(2):
            assert rewards(["p"] * 3, ["a", "b", "c"], [[]] * 3, {}, [4, 5, 6]).rewards == [0.0] * 3
        (message,) = _warnings(caplog)
        assert "returned None or NaN for all 3 completions of this step (dataset rows 4, 5, 6)" in message
        assert "learns nothing" in message
        caplog.clear()
        rewards = RewardSet.build([nothing, some])
        rewards(["p"] * 2, ["a", "b"], [[]] * 2, {}, [0, 1])  # `some` scores every row: nothing to say
        assert _warnings(caplog) == []
        rewards(["p"] * 2, ["a", "skip"], [[]] * 2, {}, [0, 1])
        rewards(["p"] * 2, ["skip", "b"], [[]] * 2, {}, [2, 3])  # said once, not per row
        rewards(["p"] * 2, ["skip", "skip"], [[]] * 2, {}, [2, 3])  # every row: said once more
        rewards(["p"] * 2, ["skip", "skip"], [[]] * 2, {}, [2, 3])
    first, every = _warnings(caplog)
    assert first.startswith("all reward functions (nothing, some) returned None or NaN for dataset row 1 (completion 1)")
    assert "returned None or NaN for all 2 completions" in every


def test_reward_errors_scored_zero_are_announced(caplog):
    """--reward-on-error zero must not hide a reward function that always fails."""
    def broken(completions, **kwargs):
        raise ValueError("boom")

    def picky(completions, **kwargs):
        return ["bad" if c == "bad" else 1.0 for c in completions]

    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        rewards = RewardSet.build([broken], on_error="zero")
        for _ in range(3):
            scores = rewards(["p"] * 3, ["a", "b", "c"], [[]] * 3, {}, [7, 8, 9])
            assert scores.rewards == [0.0] * 3 and scores.counts["reward/broken/errors"] == 3.0
        (message,) = _warnings(caplog)
        assert "'broken' failed on all 3 completions of this step (first: dataset row 7: ValueError: boom)" in message
        assert "teaches nothing" in message and "reward/broken/errors" in message
        caplog.clear()
        rewards = RewardSet.build([picky], on_error="zero")
        rewards(["p"] * 3, ["a", "bad", "c"], [[]] * 3, {}, [0, 1, 2])
        rewards(["p"] * 3, ["bad", "b", "c"], [[]] * 3, {}, [0, 1, 2])
        rewards(["p"] * 2, ["bad", "bad"], [[]] * 2, {}, [0, 1])
        rewards(["p"] * 2, ["bad", "bad"], [[]] * 2, {}, [0, 1])
    some, every = _warnings(caplog)
    assert "'picky' failed on 1 of 3 completions of this step (first: dataset row 1: returned 'bad'" in some
    assert "'picky' failed on all 2 completions" in every


def test_reward_weights_with_callable_reward_functions(tmp_path):
    """TRL's way: weights in the config, functions given to the trainer (here, train())."""
    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def half(completions, **kwargs):
        return [0.5] * len(completions)

    config = TrainConfig(**{**SMALL, "max_steps": 1}, output_dir=str(tmp_path / "run"), reward_weights=[1.0, 2.0])
    train(config, dataset=ROWS, reward_funcs=[one, half])
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["reward/mean"] == 2.0 and record["reward/half/mean"] == 0.5
    bad = TrainConfig(**{**SMALL, "max_steps": 1}, output_dir=str(tmp_path / "bad"), reward_weights=[1.0])
    with pytest.raises(UserError, match="--reward-weights has 1 values for 2 reward functions"):
        train(bad, dataset=ROWS, reward_funcs=[one, half])
    with pytest.raises(UserError, match=r"reward_funcs.*names.*train\(config, dataset, reward_funcs="):
        train(TrainConfig(**SMALL, output_dir=str(tmp_path / "names"), reward_funcs=[one]), dataset=ROWS)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "names").exists()
    with pytest.raises(UserError, match="--reward-weights weighs the reward functions of prompt datasets; toy:digits"):
        train(TrainConfig(**SMALL, output_dir=str(tmp_path / "toy"), reward_weights=[2.0]))  # nothing to weigh


def test_math_rewards():
    completions = ["so the answer is \\boxed{4}", "4", "x = 5, then 7", "\\boxed{\\frac{1}{2}}", "", "3 + 4"]
    # "x = 5, then 7" states no answer; "3 + 4" restates the question (tests/test_math_reward.py has the forms)
    assert math_reward(completions, ["4", "4", "7", "0.5", "3", "7"]) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert math_reward(["\\boxed{4}"], ["\\boxed{}"]) == [None]  # an unparsable gold answer is not scored
    chat = [[{"role": "assistant", "content": "\\boxed{9}"}]]
    assert math_reward(chat, ["9"]) == [1.0] and math_format_reward(chat) == [1.0]
    assert math_format_reward(["\\boxed{1} or \\boxed{2}", "1"]) == [0.0, 0.0]


def test_reasoning_gym_rows_and_scores():
    pytest.importorskip("reasoning_gym")
    from fp16rl.tasks.gym import gym_rows, reasoning_gym

    rows = gym_rows("basic_arithmetic", 4, seed=1)
    assert rows == gym_rows("basic_arithmetic", 4, seed=1) and rows != gym_rows("basic_arithmetic", 4, seed=2)
    assert rows[0]["prompt"][0]["role"] == "system" and "<answer>" in rows[0]["prompt"][0]["content"]
    right = [f"<answer>{r['answer']}</answer>" for r in rows]
    assert reasoning_gym(right, [r["gym_entry"] for r in rows]) == [1.0] * 4
    untagged, wrong = reasoning_gym(["no tags", "<answer>-123456</answer>"], [r["gym_entry"] for r in rows[:2]])
    assert untagged == 0.0 and wrong < 1.0  # some verifiers give partial credit for a near answer
    with pytest.raises(UserError, match="no such reasoning-gym dataset"):
        gym_rows("basic_arithmetics", 4, seed=1)
    # The generator's own options after '?': YAML scalars, passed to reasoning-gym's config.
    easy = gym_rows("chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1", 20, seed=0)
    metadata = [json.loads(r["gym_entry"])["metadata"] for r in easy]
    assert all(m["num_terms"] == 2 and m["num_digits"] == 1 for m in metadata)
    assert all(abs(int(r["answer"])) <= 18 for r in easy)
    for spec, match in [("chain_sum?max_terms", "option 'max_terms' is not key=value"),
                        ("chain_sum?no_such=1", "unexpected keyword argument 'no_such'"),
                        ("chain_sum?max_terms=[", "option 'max_terms' has an unreadable value")]:
        with pytest.raises(UserError, match=re.escape(match)):
            gym_rows(spec, 4, seed=0)


def test_python_api_example_in_the_readme_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own data and rewards"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    records = read_metrics(tmp_path / "runs" / "api-example" / "metrics.jsonl")
    assert len(records) == namespace["config"].max_steps and "reward/exact_answer/mean" in records[-1]


def test_arms_see_the_same_prompts_on_a_prompt_dataset(tmp_path):
    """fp16rl compare pairs arms on prompt datasets too: same prompts per step, different dtype."""
    from fp16rl.compare import run_comparison
    from fp16rl.report import analyse, load_inputs

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = tmp_path / "base.yaml"
    options = {**SMALL, "dataset_path": str(data), "reward_funcs": "math", "save_samples_steps": 1, "max_steps": 2}
    base.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    outcomes = run_comparison(base, ["dtype=float32", "dtype=bfloat16"], [0], tmp_path / "cmp")
    assert set(outcomes.values()) == {"finished"}
    runs = tmp_path / "cmp" / "runs"
    for step in (1, 2):
        prompts = [[json.loads(line)["prompt"] for line in (runs / arm / "seed-0" / "samples" / f"step-{step:06d}.jsonl")
                    .read_text().splitlines()] for arm in ("dtype=float32", "dtype=bfloat16")]
        assert prompts[0] == prompts[1]
    analysis = analyse(load_inputs([tmp_path / "cmp"]))
    assert analysis.comparisons[0].paired_seeds == [0] and math.isfinite(analysis.arms[1].median_logp_abs_diff)


@pytest.mark.slow
def test_math_reward_on_a_jsonl_file_rises(tmp_path):
    """The JSONL + math-verify pipeline learns (the tiny model's version of the SmolLM2 run in
    bench/RESULTS.md). The math reward pays only a stated answer, which a random tiny model never
    writes, so a 30-step warm start first teaches it to write "The answer is <digit>." with every digit
    alike; every gold answer is 7, and RL must move it to 7. fp32, whose kernels give the same numbers
    on every x86-64 CPU; measured: first 5 steps 0.18, last 10 0.97."""
    from fp16rl.model.loading import load_tokenizer, tiny_model_path
    from fp16rl.tools.sft import warm_start
    from fp16rl.tasks.base import render_chat

    base = tiny_model_path()
    tokenizer = load_tokenizer(base)
    prompts = [f"Question {i}: what number comes after six?" for i in range(32)]
    pairs = [(render_chat([{"role": "user", "content": p}], tokenizer), f" The answer is {digit}.")
             for p in prompts for digit in range(10)]
    warm = warm_start(base, pairs, tmp_path / "warm", steps=30, learning_rate=1e-2, batch_size=16, seed=0)
    data = tmp_path / "seven.jsonl"
    # Conversations: rendered with the chat template, as the warm start's pairs were (text is fed raw).
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "answer": "7"}) + "\n"
                            for p in prompts))
    train(TrainConfig(model_path=str(warm), dataset_path=str(data), reward_funcs=["math"], output_dir=str(tmp_path / "run"),
                      dtype="float32", lora_r=0, learning_rate=2e-3, num_generations=8, prompts_per_step=4,
                      max_completion_length=12, max_seq_length=256, beta=0.0, max_grad_norm=1.0, warmup_ratio=0.0,
                      max_steps=30, top_p=1.0, mask_truncated_completions=False, seed=0))
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert first < 0.4 and last > first + 0.5, rewards


def test_strings_that_are_not_utf8_are_named_by_row_in_parquet_and_saved_folders(tmp_path):
    """Arrow stores the bytes it is given: a Parquet file or a save_to_disk folder can hold a prompt that
    is not UTF-8. Loading names its row and column (it used to pass, and the first read of the row then
    ended in a UnicodeDecodeError traceback)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"What is 1 + 1?", b"caf\xe9"], pa.binary())
    table = pa.table({"prompt": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers()), "answer": ["2", "3"]})
    pq.write_table(table, tmp_path / "latin1.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for spec in (tmp_path / "latin1.parquet", tmp_path / "saved"):
        with pytest.raises(UserError, match=r"row 1, column 'prompt': not UTF-8 text"):
            prompt_data(TrainConfig(dataset_path=str(spec), reward_funcs=["math"]))


def test_a_resume_that_changes_the_overlong_punishments_parameters_is_refused(tmp_path):
    """soft_overlong_punishment is defined by its L_max and soft zone: a resume that changes either changes
    reward/mean's definition, like another reward function, so it is refused; the same (or its defaults
    spelled out) continue."""
    from fp16rl.tasks.checks import reward_conflict

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    base = dict(SMALL, dataset_path=str(data), reward_funcs=["soft_overlong_punishment"], output_dir=str(tmp_path))
    stored = vars(TrainConfig(**base))
    assert reward_conflict(stored, TrainConfig(**base)) is None
    assert reward_conflict(stored, TrainConfig(**base, overlong_max_completion_len=16,
                                               overlong_soft_punish_cache=3)) is None  # 16 // 5 = 3: the defaults
    refused = reward_conflict(stored, TrainConfig(**base, overlong_soft_punish_cache=8))
    assert refused and "soft_punish_cache=3" in refused and "soft_punish_cache=8" in refused
