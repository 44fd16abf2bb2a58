"""Judge whether a ``transform`` copies the shown train outputs instead of computing them.

The prompt shows every train pair, so a program can return a shown output when handed a shown input
(a lookup by equality or by hash, identity or anything else otherwise) and collect most of the
train credit while computing nothing. Whatever the encoding, the cells of a copied output must
come from the program's literals. Two checks find them (docs/design.md, "Copying shown outputs"):

1. Static (every program that ran; no execution): the literal symbol sequences of
   :mod:`fp16rl.tasks.arc.literals` are searched for each train output's cells, row-major,
   column-major, both reversed, and each with its leading or trailing run of equal cells cut (a
   packed int drops leading zeros). A match is *exact* (the symbols are the colours, as ints or
   digit characters) or *isomorphic* (a one-to-one substitution of the colours: ``chr(65 + c)``,
   ``c + 1``, a custom alphabet). An output is judged only when it holds enough information
   (:func:`information_bits` >= ``MIN_EXACT_BITS``, or ``MIN_ISOMORPHIC_BITS`` and ``MIN_REPEATS``
   cells that repeat an earlier colour for an isomorphic match: a pattern of all-different colours
   matches any run of all-different symbols); smaller outputs are left to the dynamic check.
2. Dynamic (only programs with a train hit, no static verdict, a wrong test grid and a literal of
   ``DYNAMIC_MIN_SYMBOLS`` symbols): the program runs again with its large literals scrambled
   (:func:`~fp16rl.tasks.arc.literals.scrambled_sources`: all at once, and the
   ``MAX_SINGLE_RERUNS`` largest one at a time). A train hit that disappears in a re-run in which
   every test output stays the same drew its cells from literals the unseen test inputs never use.

A train pair is judged copied when the program's output on it is exactly right and a check finds
it. Nothing is judged when every test grid is exactly right (the unseen grids prove the program
computes), nor when the literals hold a test output exactly (constants that encode an unseen answer
are the rule, e.g. the fixed shapes a task draws; up to a substitution would not do: a periodic
test output is often a recoloured train output). :func:`apply_verdict` then pays the program as a
valid program with every grid wrong: train grids wrong, every pixel score 0; an exactly right test
grid still counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from fp16rl.sandbox import ExecutionResult
from fp16rl.tasks.arc.data import Grid
from fp16rl.tasks.arc.literals import parse, scrambled_sources, sequences
from fp16rl.tasks.arc.reward import Evaluation

MIN_EXACT_BITS = 20.0  # information an output needs before an exact match judges it
MIN_ISOMORPHIC_BITS = 24.0  # the same for a match up to a substitution of colours
MIN_REPEATS = 8  # cells repeating an earlier colour that an isomorphic match needs
DYNAMIC_MIN_SYMBOLS = 9  # literals this large are scrambled by the dynamic check (a 3x3 grid)
MAX_SINGLE_RERUNS = 3  # largest literals also scrambled one at a time (one re-run each)
MAX_WINDOWS = 4096  # isomorphic occurrences checked for an exact one
MAX_TOTAL = 1_000_000  # literal symbols searched per program (cost bound; see docs/design.md)

RunMany = Callable[[Sequence[tuple[str, list[Grid]]]], list[ExecutionResult]]


@dataclass(frozen=True)
class CopyVerdict:
    """Which train pairs a program copied (indices), the evidence, and its scrambled re-runs."""

    copied: tuple[int, ...] = ()
    evidence: str | None = None
    reruns: int = 0


def prev_encoding(seq: np.ndarray) -> np.ndarray:
    """Baker's encoding: the distance back to the previous equal symbol, 0 for a first one. Two
    sequences are equal up to a one-to-one substitution iff their encodings are equal."""
    order = np.argsort(seq, kind="stable")
    ordered = seq[order]
    same = ordered[1:] == ordered[:-1]
    prev = np.zeros(len(seq), dtype=np.int64)
    later, earlier = order[1:][same], order[:-1][same]
    prev[later] = later - earlier
    return prev


def find_isomorphic(text: np.ndarray, text_prev: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start positions where ``pattern`` occurs in ``text`` up to a one-to-one substitution.

    In a window starting at ``s`` the encoding at offset ``i`` is ``text_prev[s + i]`` when that
    distance stays inside the window (``<= i``) and 0 otherwise; the candidates are narrowed one
    offset at a time, so the cost is about ``len(text)`` times the few offsets that most
    candidates survive."""
    m, n = len(pattern), len(text)
    if m == 0 or n < m:
        return np.zeros(0, dtype=np.int64)
    pattern_prev = prev_encoding(pattern)
    starts = np.arange(n - m + 1)
    for i in range(m):
        window = text_prev[starts + i]
        starts = starts[np.where(window <= i, window, 0) == pattern_prev[i]]
        if starts.size == 0:
            break
    return starts


def _variants(grid: Grid) -> list[np.ndarray]:
    """The cell orders a copy may be stored in (see the module docstring)."""
    array = np.asarray(grid, dtype=np.int64)
    orders = [array.ravel(), array.T.ravel()]
    out: list[np.ndarray] = []
    for cells in [*orders, *(o[::-1] for o in orders)]:
        lead = int(np.argmax(cells != cells[0])) if (cells != cells[0]).any() else len(cells)
        trail = int(np.argmax(cells[::-1] != cells[-1])) if (cells != cells[-1]).any() else len(cells)
        out += [cells, cells[lead:], cells[: len(cells) - trail]]
    return out


def information_bits(cells: np.ndarray) -> float:
    """``m * H``: the cells' count times the empirical entropy of their colours, in bits. A run of
    ordinary code constants (mostly 0s and 1s) holds a low-information pattern by chance."""
    _, counts = np.unique(cells, return_counts=True)
    freq = counts / len(cells)
    return float(-(counts * np.log2(freq)).sum())


def _judgeable(cells: np.ndarray) -> tuple[bool, bool]:
    """(exact match may judge it, isomorphic match may judge it)."""
    bits = information_bits(cells)
    distinct = len(np.unique(cells))
    return bits >= MIN_EXACT_BITS, bits >= MIN_ISOMORPHIC_BITS and len(cells) - distinct >= MIN_REPEATS


def joined(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The sequences as one, each boundary a distinct negative symbol (literal symbols are >= 0),
    so that one search covers all of them; cut at ``MAX_TOTAL`` symbols."""
    pieces: list[np.ndarray] = []
    for k, part in enumerate(parts):
        pieces += [part, np.array([-1 - k], dtype=np.int64)]
    text = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return text[:MAX_TOTAL]


def _found(grid: Grid, text: np.ndarray, text_prev: np.ndarray) -> str | None:
    """How ``grid`` was found in the joined literal sequences ("exact"/"isomorphic"), or None."""
    for cells in _variants(grid):
        exact_ok, iso_ok = _judgeable(cells)
        if not exact_ok:
            continue
        starts = find_isomorphic(text, text_prev, cells)
        if starts.size == 0:
            continue
        windows = text[starts[:MAX_WINDOWS, None] + np.arange(len(cells))]
        if ((windows == cells).all(axis=1) | (windows - 48 == cells).all(axis=1)).any():  # ints, digit chars
            return "exact"
        if iso_ok:
            return "isomorphic"
    return None


def static_copies(code: str, train_outputs: Sequence[Grid], test_outputs: Sequence[Grid],
                  hits: Sequence[bool]) -> CopyVerdict:
    """The train pairs whose right output the program's literals hold (no execution)."""
    tree = parse(code)
    if tree is None or not any(hits):
        return CopyVerdict()
    text = joined(sequences(tree))
    text_prev = prev_encoding(text)
    if any(_found(grid, text, text_prev) == "exact" for grid in test_outputs):
        return CopyVerdict()
    found = {i: how for i, grid in enumerate(train_outputs) if hits[i] and (how := _found(grid, text, text_prev))}
    if not found:
        return CopyVerdict()
    evidence = "static: " + ", ".join(f"train {i} output in the literals ({how})" for i, how in found.items())
    return CopyVerdict(copied=tuple(found), evidence=evidence)


def dynamic_copies(original: ExecutionResult, reruns: Sequence[ExecutionResult], n_train: int,
                   hits: Sequence[bool]) -> CopyVerdict:
    """Train hits lost in a scrambled re-run that left every test output as it was."""
    lost = sorted({i for rerun in reruns if rerun.outputs[n_train:] == original.outputs[n_train:]
                   for i in range(n_train) if hits[i] and rerun.outputs[i] != original.outputs[i]})
    if not lost:
        return CopyVerdict(reruns=len(reruns))
    evidence = (f"dynamic: train {', '.join(map(str, lost))} output changed with the program's literals "
                "scrambled, the test outputs did not")
    return CopyVerdict(copied=tuple(lost), evidence=evidence, reruns=len(reruns))


def _needs_check(code: str | None, evaluation: Evaluation) -> bool:
    """Only a program that ran, hit a train grid and missed a test grid can be paid for copies."""
    return (code is not None and evaluation.ok and any(evaluation.train_correct)
            and not all(evaluation.test_correct))


def judge_copying(codes: Sequence[str | None], pairs: Sequence[tuple[list[Grid], list[Grid], list[Grid]]],
                  results: Sequence[ExecutionResult], evaluations: Sequence[Evaluation],
                  run_many: RunMany) -> list[CopyVerdict]:
    """Verdicts for a batch: ``pairs[k]`` is (inputs, train outputs, test outputs) of program k.
    The static check runs first; the scrambled re-runs of the rest go to ``run_many`` at once."""
    verdicts = [CopyVerdict()] * len(codes)
    reruns: list[tuple[int, str]] = []
    for k, (code, (_, train, test), ev) in enumerate(zip(codes, pairs, evaluations)):
        if not _needs_check(code, ev):
            continue
        verdicts[k] = static_copies(code, train, test, ev.train_correct)
        if not verdicts[k].copied:
            reruns += [(k, source) for source in scrambled_sources(code, DYNAMIC_MIN_SYMBOLS, MAX_SINGLE_RERUNS)]
    outcomes = run_many([(source, pairs[k][0]) for k, source in reruns]) if reruns else []
    by_program: dict[int, list[ExecutionResult]] = {}
    for (k, _), rerun in zip(reruns, outcomes):
        by_program.setdefault(k, []).append(rerun)
    for k, program_reruns in by_program.items():
        verdicts[k] = dynamic_copies(results[k], program_reruns, len(pairs[k][1]), evaluations[k].train_correct)
    return verdicts


def apply_verdict(evaluation: Evaluation, verdict: CopyVerdict) -> Evaluation:
    """The evaluation paid as a valid program with every grid wrong when it copied: no train
    grid right, every pixel score 0; exactly right test grids keep counting (they were unseen)."""
    if not verdict.copied:
        return evaluation
    return replace(
        evaluation,
        train_correct=[False] * len(evaluation.train_correct),
        train_pixel=[0.0] * len(evaluation.train_pixel),
        test_pixel=[0.0] * len(evaluation.test_pixel),
        copied_train=list(verdict.copied),
        copy_evidence=verdict.evidence,
    )
