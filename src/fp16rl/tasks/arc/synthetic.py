"""arc-lite: small ARC-like tasks generated from one-line grid programs, perfectible by design.

Each task applies one program (flip, rotation, transpose, recolour, colour swap, crop to the
non-zero bounding box, scale-up, tile, cyclic shift, mirror-extend, identity) to 2-4 train inputs
and 1 test input. Its reference solution is a short ``transform`` source (numpy allowed) whose
docstring states the rule; outputs are computed by running that very source, so the reference
scores the maximum reward. Task ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fp16rl.core.atomic import atomic_write_text
from fp16rl.tasks.arc.data import MAX_SIDE, ArcTaskData, Grid, TaskMap, task_problem, write_task_map
from fp16rl.tasks.arc.encoders import ColorNameEncoder, GridEncoder
from fp16rl.tasks.arc.prompts import PromptTemplate, build_messages, render_messages

DEFAULT_MIN_SIDE = 3
DEFAULT_MAX_SIDE = 6
_MAX_ATTEMPTS = 50  # redraws of a task's inputs until its train pairs show the rule


@dataclass(frozen=True)
class Rule:
    """One drawn program: its sentence, the body of ``transform`` and colours every input needs."""

    text: str
    body: str
    colors: tuple[int, ...] = ()


@dataclass(frozen=True)
class Program:
    """A grid program family: how it grows grids, its input style, and how to draw a rule."""

    name: str
    growth: int  # output side <= growth * input side; bounds the input size
    sparse: bool  # inputs are one object on a zero background (crop needs that)
    make: Callable[[np.random.Generator], Rule]


def _source(rule: str, body: str) -> str:
    return f'import numpy as np\n\n\ndef transform(grid):\n    """{rule}"""\n    g = np.array(grid)\n{body}'


def _fixed(text: str, body: str) -> Callable[[np.random.Generator], Rule]:
    return lambda rng: Rule(text, body)


def _rotate(rng: np.random.Generator) -> Rule:
    k = int(rng.integers(1, 4))
    turn = {1: "a quarter turn counter-clockwise", 2: "a half turn", 3: "a quarter turn clockwise"}[k]
    return Rule(f"Rotate the grid by {turn}.", f"    return np.rot90(g, {k}).tolist()\n")


def _recolor(rng: np.random.Generator) -> Rule:
    a, b = (int(c) for c in rng.choice(np.arange(1, 10), size=2, replace=False))
    return Rule(
        f"Paint every cell of colour {a} with colour {b}.",
        f"    g[g == {a}] = {b}\n    return g.tolist()\n",
        (a,),
    )


def _swap(rng: np.random.Generator) -> Rule:
    a, b = (int(c) for c in rng.choice(np.arange(1, 10), size=2, replace=False))
    return Rule(
        f"Swap colours {a} and {b}.",
        f"    out = g.copy()\n    out[g == {a}] = {b}\n    out[g == {b}] = {a}\n    return out.tolist()\n",
        (a, b),
    )


def _scale(rng: np.random.Generator) -> Rule:
    f = int(rng.integers(2, 4))
    return Rule(
        f"Scale the grid up {f} times: each cell becomes a {f}x{f} block.",
        f"    return np.repeat(np.repeat(g, {f}, axis=0), {f}, axis=1).tolist()\n",
    )


def _tile(rng: np.random.Generator) -> Rule:
    ry, rx = [(1, 2), (2, 1), (2, 2)][int(rng.integers(3))]
    return Rule(
        f"Tile the grid {ry} time(s) vertically and {rx} time(s) horizontally.",
        f"    return np.tile(g, ({ry}, {rx})).tolist()\n",
    )


def _shift(rng: np.random.Generator) -> Rule:
    axis = int(rng.integers(2))
    k = int(rng.integers(1, 3))
    direction = "down" if axis == 0 else "right"
    return Rule(
        f"Shift the grid {direction} by {k}, wrapping cells around the edge.",
        f"    return np.roll(g, {k}, axis={axis}).tolist()\n",
    )


PROGRAMS: tuple[Program, ...] = (
    Program("identity", 1, False, _fixed("Return the grid unchanged.", "    return g.tolist()\n")),
    Program("flip-lr", 1, False, _fixed("Mirror the grid left to right.", "    return np.fliplr(g).tolist()\n")),
    Program("flip-ud", 1, False, _fixed("Mirror the grid top to bottom.", "    return np.flipud(g).tolist()\n")),
    Program("rotate", 1, False, _rotate),
    Program("transpose", 1, False, _fixed("Transpose the grid (rows become columns).", "    return g.T.tolist()\n")),
    Program("recolor", 1, False, _recolor),
    Program("swap-colors", 1, False, _swap),
    Program(
        "crop",
        1,
        True,
        _fixed(
            "Crop the grid to the bounding box of its non-zero cells.",
            "    ys, xs = np.nonzero(g)\n    return g[ys.min():ys.max() + 1, xs.min():xs.max() + 1].tolist()\n",
        ),
    ),
    Program("scale", 3, False, _scale),
    Program("tile", 2, False, _tile),
    Program("shift", 1, False, _shift),
    Program(
        "mirror-extend",
        2,
        False,
        _fixed(
            "Append the left-right mirror image of the grid to its right.",
            "    return np.concatenate([g, np.fliplr(g)], axis=1).tolist()\n",
        ),
    ),
)


def _compile(source: str) -> Callable[[Grid], Grid]:
    """Our own reference source, run in-process to produce the expected outputs."""
    namespace: dict[str, Any] = {}
    exec(compile(source, "<arc-lite reference>", "exec"), namespace)
    return namespace["transform"]


def _dense_grid(rng: np.random.Generator, side_range: tuple[int, int], palette: np.ndarray) -> np.ndarray:
    h, w = rng.integers(side_range[0], side_range[1] + 1, size=2)
    return rng.choice(palette, size=(h, w))


def _object_grid(rng: np.random.Generator, side_range: tuple[int, int], palette: np.ndarray) -> np.ndarray:
    """One random non-zero patch, strictly smaller than the grid, on a zero background."""
    h, w = (int(s) for s in rng.integers(side_range[0], side_range[1] + 1, size=2))
    oh, ow = int(rng.integers(1, h)), int(rng.integers(1, w))
    y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    grid = np.zeros((h, w), dtype=int)
    grid[y : y + oh, x : x + ow] = rng.choice(palette[palette != 0], size=(oh, ow))
    return grid


def _palette(rng: np.random.Generator, rule_colors: tuple[int, ...]) -> np.ndarray:
    """Background 0, the colours the rule mentions, and one or two others."""
    others = [c for c in range(1, 10) if c not in rule_colors]
    extra = rng.choice(others, size=int(rng.integers(1, 3)), replace=False)
    return np.array(sorted({0, *rule_colors, *(int(c) for c in extra)}))


def generate_task(
    seed: int, index: int, min_side: int = DEFAULT_MIN_SIDE, max_side: int = DEFAULT_MAX_SIDE
) -> tuple[str, ArcTaskData, str]:
    """Task ``index`` of the arc-lite set for ``seed``: (task id, task, reference source)."""
    rng = np.random.default_rng([seed, index])
    programs = [p for p in PROGRAMS if MAX_SIDE // p.growth >= min_side]
    program = programs[int(rng.integers(len(programs)))]
    rule = program.make(rng)
    source = _source(rule.text, rule.body)
    transform = _compile(source)
    sides = (min_side, min(max_side, MAX_SIDE // program.growth))
    palette = _palette(rng, rule.colors)
    n_train = int(rng.integers(2, 5))
    for _ in range(_MAX_ATTEMPTS):
        inputs = [
            (_object_grid if program.sparse else _dense_grid)(rng, sides, palette) for _ in range(n_train + 1)
        ]
        for grid in inputs:  # the rule's colours must appear, or recolour examples show nothing
            for c in rule.colors:
                grid[int(rng.integers(grid.shape[0])), int(rng.integers(grid.shape[1]))] = c
        pairs = [{"input": g.tolist(), "output": transform(g.tolist())} for g in inputs]
        if program.name == "identity" or any(p["input"] != p["output"] for p in pairs[:n_train]):
            break
    task: ArcTaskData = {"train": pairs[:n_train], "test": pairs[n_train:]}
    problem = task_problem(task)
    if problem:  # a generator bug, not a user error
        raise AssertionError(f"arc-lite {program.name} made an invalid task: {problem}")
    return f"{index:06d}-{program.name}", task, source


def generate_tasks(
    num_tasks: int, seed: int, min_side: int = DEFAULT_MIN_SIDE, max_side: int = DEFAULT_MAX_SIDE
) -> tuple[TaskMap, dict[str, str]]:
    """``num_tasks`` arc-lite tasks and their reference programs, keyed by task id."""
    if not 2 <= min_side <= max_side <= MAX_SIDE:
        raise ValueError(f"need 2 <= min_side <= max_side <= {MAX_SIDE}, got {min_side}..{max_side}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    tasks: TaskMap = {}
    programs: dict[str, str] = {}
    for index in range(num_tasks):
        task_id, task, source = generate_task(seed, index, min_side, max_side)
        tasks[task_id], programs[task_id] = task, source
    return tasks, programs


def programs_path(path: Path) -> Path:
    """Side file of reference programs: ``arc-lite.json.gz`` -> ``arc-lite.programs.json``."""
    name = path.name
    for suffix in (".gz", ".json"):
        name = name.removesuffix(suffix)
    return path.with_name(f"{name}.programs.json")


def write_synthetic(
    path: Path,
    num_tasks: int,
    seed: int,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = DEFAULT_MAX_SIDE,
) -> tuple[Path, Path]:
    """Write the task map (gzipped if ``.gz``) and its programs side file; returns both paths."""
    tasks, programs = generate_tasks(num_tasks, seed, min_side, max_side)
    write_task_map(path, tasks)
    side = programs_path(path)
    atomic_write_text(side, json.dumps(programs, indent=1))
    return path, side


def read_programs(path: Path) -> dict[str, str]:
    """Reference programs written beside dataset ``path`` by :func:`write_synthetic`."""
    return json.loads(programs_path(path).read_text())


def program_rule(source: str) -> str:
    """The rule sentence: the docstring of the source's ``transform``."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "transform":
            return ast.get_docstring(node) or ""
    raise ValueError("source defines no transform function")


def sft_completion(source: str) -> str:
    """What the assistant writes after its prefix: the rule in a sentence, then the code block."""
    return f"\n\nThe rule: {program_rule(source)}\n\n```python\n{source}```"


def sft_pairs(
    tasks: TaskMap,
    programs: dict[str, str],
    tokenizer: Any | None = None,
    encoder: GridEncoder | None = None,
    template: PromptTemplate | None = None,
) -> Iterator[tuple[str, str]]:
    """(prompt, completion) pairs for a supervised warm start, in task-id order, unaugmented
    (several rules, e.g. recolour or rotate, do not commute with augmentation). The completion
    carries no end-of-turn token; the SFT loop appends the tokenizer's EOS."""
    encoder = encoder or ColorNameEncoder()
    template = template or PromptTemplate()
    for task_id in sorted(tasks):
        messages = build_messages(tasks[task_id], 0, encoder, template)
        yield render_messages(messages, tokenizer), sft_completion(programs[task_id])
