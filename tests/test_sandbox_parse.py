"""The trainer-side result parser: total (every input maps to a typed result), bounded in lines
and bytes, strict about JSON types, and overruled by what the server observed. Includes fuzz
tests of the parser alone and of ``Sandbox.run`` with programs that write random bytes."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator

import pytest

from fp16rl.sandbox import ExecutionResult, Outcome, Sandbox, SandboxLimits, interpret
from fp16rl.sandbox.results import _interpret
from fp16rl.sandbox.common import clean_text

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=512)
CLEAN = {"status": "exited", "code": 0, "maxrss_kb": 1000, "cpu_s": 0.01}


def _signaled(sig: int, maxrss_mb: float, cpu_s: float = 0.1) -> dict[str, object]:
    return {"status": "signaled", "signal": int(sig), "maxrss_kb": int(maxrss_mb * 1024), "cpu_s": cpu_s}


@pytest.mark.parametrize(
    ("header", "outcome", "error"),
    [
        (_signaled(signal.SIGKILL, 100), Outcome.MEMORY_LIMIT, "killed by SIGKILL"),  # OOM killer
        (_signaled(signal.SIGSEGV, 500), Outcome.MEMORY_LIMIT, "SIGSEGV at 500 MB"),
        (_signaled(signal.SIGSEGV, 50), Outcome.EXCEPTION, "killed by SIGSEGV"),
        (_signaled(signal.SIGXCPU, 50), Outcome.TIMEOUT, "CPU time limit"),
        (_signaled(signal.SIGKILL, 50, cpu_s=2.5), Outcome.TIMEOUT, "CPU time limit"),
        ({"status": "timeout"}, Outcome.TIMEOUT, "timeout after 1.0s"),
        ({"status": "killed"}, Outcome.INVALID_OUTPUT, "result larger than"),
        ({"status": "exited", "code": 0}, Outcome.EXCEPTION, "without reporting grid 1"),
        ({"status": "exited", "code": 3}, Outcome.EXCEPTION, "exited (code 3)"),
        ({"status": "exited", "code": True}, Outcome.EXCEPTION, "exited (code ?)"),
        ({"status": "signaled", "signal": "x"}, Outcome.EXCEPTION, "broke protocol"),
        ({"status": "signaled", "signal": 9, "cpu_s": 10**400, "maxrss_kb": 1}, Outcome.EXCEPTION, "broke protocol"),
        ({"status": ["timeout"]}, Outcome.EXCEPTION, "broke protocol"),
        ({"status": "weird"}, Outcome.EXCEPTION, "broke protocol"),
        ([1, 2], Outcome.EXCEPTION, "broke protocol"),
    ],
)
def test_process_level_outcomes(header: object, outcome: Outcome, error: str) -> None:
    result = interpret(header, b'{"i":0,"grid":[[1]]}\n', 2, LIMITS)
    assert result.outcome == outcome and error in (result.error or "")
    assert result.outputs == [[[1]], None]


def test_the_server_observation_wins_over_forged_lines() -> None:
    """Every grid reported with a valid grid, then the child hung, crashed or exited 3: the
    lines were written by the program itself and prove nothing."""
    forged = b'{"i":0,"grid":[[1]]}\n{"i":1,"grid":[[2]]}\n'
    assert interpret(CLEAN, forged, 2, LIMITS).outcome == Outcome.OK
    for header, outcome in [({"status": "timeout"}, Outcome.TIMEOUT),
                            (_signaled(signal.SIGSEGV, 10), Outcome.EXCEPTION),
                            ({"status": "exited", "code": 3}, Outcome.EXCEPTION),
                            ({"status": "killed"}, Outcome.INVALID_OUTPUT)]:
        assert interpret(header, forged, 2, LIMITS).outcome == outcome
    assert interpret(CLEAN, forged, 2, LIMITS, oversize=True).outcome == Outcome.INVALID_OUTPUT


def test_setup_failure_is_reported_with_its_reason() -> None:
    line = b'{"kind":"setup_error","error":"landlock: landlock_restrict_self: Invalid argument"}\n'
    result = interpret({"status": "exited", "code": 71}, line, 1, LIMITS)
    assert result.outcome == Outcome.EXCEPTION
    assert result.error == "sandbox setup failed: landlock: landlock_restrict_self: Invalid argument"


def test_interpret_distrusts_the_payload() -> None:
    payload = (
        b"garbage\n[1, 2]\n"
        b'{"i": 7, "grid": [[1]]}\n{"i": true, "grid": [[1]]}\n{"i": "0", "grid": [[1]]}\n'
        + b"[" * 100_000 + b"\n"
        + b'{"i": 0, "grid": [[2]]}\n{"i": 0, "grid": [[3]]}\n'
        b'{"i": 1, "grid": [[4]]}\n{"i": 2, "grid": [[5]]'  # unterminated: incomplete
    )
    result = interpret(CLEAN, payload, 3, LIMITS)
    assert result.outputs == [[[2]], [[4]], None]
    assert result.outcome == Outcome.EXCEPTION and "without reporting grid 2" in (result.error or "")


@pytest.mark.parametrize(
    "line",
    [
        b'{"kind": [], "error": "unhashable kind"}',  # stopped the whole run before issue 10
        b'{"kind": {"a": 1}, "error": {}}',
        b'{"i": {"a": 1}, "grid": [[1]]}',
        b'{"i": [0], "kind": "exception"}',
        b'{"i": 0, "kind": [1, 2], "error": null}',
        b'{"i": 0, "kind": "exception", "error": [1]}',
        b'{"i": 0, "grid": "[[1]]"}',
        b'{"i": 0, "grid": [[1e999]]}',
        b'{"i": 0, "grid": [[NaN]]}',
        b'{"i": 1e400, "grid": [[1]]}',
        b'{"i": 0, "grid": [[true]]}',
        b'{"i": 0, "grid": [[' + b"1" * 5000 + b"]]}",  # an int too long to convert
    ],
)
def test_fields_of_the_wrong_type_never_raise(line: bytes) -> None:
    result = _interpret(CLEAN, line + b"\n", 1, LIMITS, False)
    assert result.outcome != Outcome.OK and result.outputs == [None]


def test_parsing_is_bounded_in_lines_and_bytes() -> None:
    """A payload at the byte cap made of empty lines, empty objects or deep nesting costs the
    trainer milliseconds (before issue 10 every line was parsed: seconds of trainer CPU)."""
    cap = LIMITS.max_output_bytes
    for piece in (b"\n", b"{}\n", b"[" * 4000 + b"\n", b'{"kind":"nothing"}\n'):
        payload = (piece * (cap // len(piece) + 1))[:cap]
        start = time.thread_time()
        result = interpret(CLEAN, payload, 10, LIMITS)
        assert time.thread_time() - start < 0.05, piece[:10]
        assert result.outcome == Outcome.EXCEPTION and result.outputs == [None] * 10
    # Lines longer than any honest one are skipped unparsed, even if they hold a valid result.
    long_line = b'{"i":0,"grid":[[1]],"pad":"' + b"x" * 10_000 + b'"}\n'
    assert interpret(CLEAN, long_line, 1, LIMITS).outcome == Outcome.EXCEPTION
    # Only the first 2n + 8 lines are read: an honest child writes n of them.
    flood = b"\n" * 10 + b'{"i":0,"grid":[[1]]}\n'
    assert interpret(CLEAN, flood, 1, LIMITS).outcome == Outcome.EXCEPTION
    assert interpret(CLEAN, b"\n" * 9 + b'{"i":0,"grid":[[1]]}\n', 1, LIMITS).outcome == Outcome.OK


def test_control_characters_are_stripped() -> None:
    nasty = "\x1b[2J\x1b[31mPWNED\x07\r\nINFO ok\x08\x00\u202etxt\x9b31m\u2028\ud800 é 中"
    assert clean_text(nasty) == "?[2J?[31mPWNED???INFO ok???txt?31m?? é 中"
    assert clean_text(nasty).isprintable()
    line = json.dumps({"i": 0, "kind": "exception", "error": nasty}).encode() + b"\n"
    result = interpret(CLEAN, line, 1, LIMITS)
    assert result.error is not None and result.error.isprintable() and "PWNED" in result.error
    assert clean_text("x" * 1000) == "x" * 300 and clean_text(None) == "" and clean_text(b"x") == ""


# --- fuzzing ------------------------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(10 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, 1, 9, 10, -1, 2**70, rng.randrange(-5, 15)])
    if choice == 3:
        return rng.choice([0.0, 1.5, 1e308, -0.0, float(rng.randrange(10))])
    if choice == 4:
        return rng.choice(["", "ok", "exception", "parse_error", "setup_error", "\x1b[31m", "grid"])
    if choice == 5:
        return [rng.randrange(12) for _ in range(rng.randrange(4))]
    if choice in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["i", "kind", "error", "grid", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _random_line(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 1:
        grid = [[rng.randrange(11) for _ in range(rng.randrange(1, 4))] for _ in range(rng.randrange(1, 4))]
        return json.dumps({"i": rng.randrange(-1, n + 1), "grid": grid}).encode()
    if kind == 2:
        return json.dumps({"i": rng.randrange(n), "kind": _random_json(rng), "error": _random_json(rng)}).encode()
    if kind == 3:
        return json.dumps({"kind": _random_json(rng), "error": _random_json(rng)}).encode()
    line = json.dumps(_random_json(rng), allow_nan=True).encode()
    return line[: rng.randrange(len(line) + 1)] if kind == 4 else line


def _random_header(rng: random.Random) -> object:
    if rng.random() < 0.5:
        return rng.choice([CLEAN, {"status": "timeout"}, _signaled(rng.randrange(-2, 70), rng.random() * 600),
                           {"status": "exited", "code": rng.randrange(-3, 300)}, {"status": "killed"}])
    return _random_json(rng)


def _assert_well_formed(result: ExecutionResult, n: int) -> None:
    assert isinstance(result.outcome, Outcome) and len(result.outputs) == n
    assert result.error is None or (type(result.error) is str and result.error.isprintable())
    for grid in result.outputs:
        assert grid is None or all(type(c) is int and 0 <= c <= 9 for row in grid for c in row)
    if result.outcome == Outcome.OK:
        assert all(grid is not None for grid in result.outputs)


def test_fuzz_the_parser() -> None:
    rng = random.Random(10)
    for _ in range(3000):
        n = rng.randrange(1, 5)
        payload = b"\n".join(_random_line(rng, n) for _ in range(rng.randrange(12))) + rng.choice([b"", b"\n"])
        header = _random_header(rng)
        result = _interpret(header, payload, n, LIMITS, rng.random() < 0.05)  # no safety net here
        _assert_well_formed(result, n)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(n_jobs=2, limits=LIMITS) as sb:
        yield sb


def test_fuzz_sandbox_run_never_raises(sandbox: Sandbox) -> None:
    """Programs that write random lines into every descriptor, then return, exit with a random
    status or hang: Sandbox.run always answers with a well-formed result, and never OK for a
    program that did not exit cleanly."""
    rng = random.Random(11)
    jobs = []
    for _ in range(24):
        data = b"\n".join(_random_line(rng, 2) for _ in range(rng.randrange(1, 30))) + b"\n"
        ending = rng.choice(["return [[1]]", f"os._exit({rng.randrange(0, 256)})", "while True: pass",
                             "raise SystemExit('\\x1b[31m')", "return object()"])
        code = (f"import os\nDATA = {data!r}\nfor fd in range(3, 64):\n    try:\n        os.write(fd, DATA)\n"
                f"    except OSError:\n        pass\n\ndef transform(grid):\n    {ending}\n")
        jobs.append((code, [[[1]], [[2]]], ending))
    results = sandbox.run_many([(code, inputs) for code, inputs, _ in jobs])
    for (_, _, ending), result in zip(jobs, results, strict=True):
        _assert_well_formed(result, 2)
        if ending.startswith("while"):
            assert result.outcome == Outcome.TIMEOUT
        if ending.startswith("os._exit") and ending != "os._exit(0)":
            assert result.outcome != Outcome.OK
