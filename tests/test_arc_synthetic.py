"""arc-lite: deterministic, valid, small, and every reference program scores 10 in the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp16rl.sandbox import Sandbox, SandboxLimits, extract_code
from fp16rl.tasks.arc.data import load_dataset, task_problem
from fp16rl.tasks.arc.prompts import DEFAULT_ASSISTANT_PREFIX
from fp16rl.tasks.arc.reward import arc_v1, arc_v2_no_pixel_score, evaluate
from fp16rl.tasks.arc.synthetic import (
    PROGRAMS,
    generate_tasks,
    program_rule,
    programs_path,
    read_programs,
    sft_pairs,
    write_synthetic,
)


def test_deterministic_per_seed_and_index() -> None:
    tasks, programs = generate_tasks(20, seed=1)
    assert generate_tasks(20, seed=1) == (tasks, programs)
    first5, _ = generate_tasks(5, seed=1)
    assert first5 == {k: tasks[k] for k in list(tasks)[:5]}  # task i does not depend on num_tasks
    assert generate_tasks(20, seed=2)[0] != tasks


def test_tasks_are_valid_small_and_shaped_like_arc() -> None:
    tasks, programs = generate_tasks(120, seed=0)
    assert {tid.split("-", 1)[1] for tid in tasks} == {p.name for p in PROGRAMS}
    for task_id, task in tasks.items():
        assert task_problem(task) is None, task_id
        assert 2 <= len(task["train"]) <= 4 and len(task["test"]) == 1
        for pair in (*task["train"], *task["test"]):
            assert 3 <= len(pair["input"]) <= 6 and 3 <= len(pair["input"][0]) <= 6
        if not task_id.endswith("identity"):  # the examples show the rule
            assert any(p["input"] != p["output"] for p in task["train"]), task_id
        assert program_rule(programs[task_id])


def test_side_range_is_checked() -> None:
    with pytest.raises(ValueError, match="min_side"):
        generate_tasks(3, seed=0, min_side=5, max_side=4)
    big, _ = generate_tasks(30, seed=0, min_side=12, max_side=30)
    assert all(task_problem(t) is None for t in big.values())


def test_write_and_read_back(tmp_path: Path) -> None:
    path, side = write_synthetic(tmp_path / "lite.json.gz", num_tasks=8, seed=3)
    assert side == programs_path(path) == tmp_path / "lite.programs.json"
    ds = load_dataset(path)
    tasks, programs = generate_tasks(8, seed=3)
    assert ds.tasks == tasks and read_programs(path) == programs


def test_sft_pairs_continue_the_prompt_with_the_reference_code() -> None:
    tasks, programs = generate_tasks(4, seed=0)
    pairs = list(sft_pairs(tasks, programs))
    assert len(pairs) == 4
    for (prompt, completion), task_id in zip(pairs, sorted(tasks)):
        assert prompt.endswith(DEFAULT_ASSISTANT_PREFIX)
        assert program_rule(programs[task_id]) in completion
        assert extract_code(completion).strip() == programs[task_id].strip()


def test_reference_programs_score_ten_through_the_sandbox() -> None:
    tasks, programs = generate_tasks(48, seed=5)
    ids = sorted(tasks)
    jobs = [(programs[t], [p["input"] for p in (*tasks[t]["train"], *tasks[t]["test"])]) for t in ids]
    with Sandbox(n_jobs=2, limits=SandboxLimits(timeout_s=5.0)) as sandbox:
        results = sandbox.run_many(jobs)
    for task_id, result in zip(ids, results):
        task = tasks[task_id]
        ev = evaluate(result, [p["output"] for p in task["train"]], [p["output"] for p in task["test"]])
        assert ev.ok, (task_id, ev.outcome, ev.error)
        assert arc_v2_no_pixel_score(ev) == 10.0 and arc_v1(ev) == 10.0, task_id
