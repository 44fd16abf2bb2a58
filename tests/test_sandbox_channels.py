"""Issue 23, section 3: channels between programs and the weaker settings. Each test failed
against the sandbox before issue 23; the hostile programs live in tests/hostile/."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fp16rl.sandbox import OPTIONAL_LAYERS, Outcome, Sandbox
from tests.test_sandbox import FLIP, GRIDS, LIMITS, hostile

EXIT_77 = "import os\n\ndef transform(grid):\n    os._exit(77)\n"
READ_OOM = ("def transform(grid):\n    with open('/proc/self/oom_score_adj') as f:\n"
            "        return [[int(d) for d in f.read().strip()]]\n")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(n_jobs=1, limits=LIMITS) as sb:
        yield sb


@pytest.fixture(scope="module")
def bare_sandbox() -> Iterator[Sandbox]:
    with Sandbox(n_jobs=1, limits=LIMITS, disable=OPTIONAL_LAYERS) as sb:
        yield sb


def _seccomp(sb: Sandbox) -> None:
    if sb.layers()["seccomp"] != "active":
        pytest.skip(f"seccomp: {sb.layers()['seccomp']}")


# --- the previous program's report ------------------------------------------------------------


@pytest.mark.parametrize("layers", ["all", "none"])
def test_no_report_on_an_earlier_program_is_reachable(sandbox: Sandbox, bare_sandbox: Sandbox, layers: str) -> None:
    """The fork server learns each program's exit status, peak memory and CPU time; the next
    program on that worker found them in the server's frames before issue 23. Programs now
    start from a zygote forked before the first report existed, whatever the layers."""
    sb = sandbox if layers == "all" else bare_sandbox
    for _ in range(2):
        steered = sb.run(EXIT_77, [[[1]]])
        assert steered.outcome == Outcome.EXCEPTION and "code 77" in (steered.error or ""), steered
        result = sb.run(hostile("previous_report"), [[[1]]])
        assert result.outcome == Outcome.EXCEPTION and "no report" in (result.error or ""), result
    assert sb.run(FLIP, GRIDS).outcome == Outcome.OK


def _descendants(pid: int) -> list[int]:
    """Every live process below pid (through /proc/<pid>/task/*/children; zombies left out)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(child)
            found += _descendants(child)
    return found


def test_leftover_processes_die_with_the_program() -> None:
    """Without seccomp and the privilege drop a program can fork; a child that left its
    process group survives a group kill, but not the end of the program's own PID namespace."""
    with Sandbox(n_jobs=1, limits=LIMITS, disable=("seccomp", "privilege_drop")) as sb:
        if sb.layers()["pid_namespace"] != "active":
            pytest.skip(f"pid_namespace: {sb.layers()['pid_namespace']}")
        worker = sb._workers[0]._proc
        assert worker is not None
        sb.run(FLIP, GRIDS)
        before = _descendants(worker.pid)
        code = ("import os, time\n\ndef transform(grid):\n    if os.fork() == 0:\n        os.setsid()\n"
                "        time.sleep(30)\n        os._exit(0)\n    return grid\n")
        assert sb.run(code, [[[1]]]).outcome == Outcome.OK
        # The server, its zygote and the child waiting for the next program; no leftover.
        assert len(_descendants(worker.pid)) == len(before), (before, _descendants(worker.pid))


# --- shared futexes -------------------------------------------------------------------------


def test_shared_futex_operations_are_refused(sandbox: Sandbox, bare_sandbox: Sandbox) -> None:
    _seccomp(sandbox)
    control = bare_sandbox.run(hostile("futex_channel"), [[[1]]])
    assert control.outcome == Outcome.OK and control.outputs[0][0][0] >= 5, control  # the probe works
    result = sandbox.run(hostile("futex_channel"), [[[1]]])
    assert result.outcome == Outcome.EXCEPTION and "no shared futex" in (result.error or ""), result


def test_threads_and_locks_still_work_under_the_filter() -> None:
    """glibc and CPython use private futexes for locks, conditions, semaphores and thread exit.
    Threads need a root sandbox without the privilege drop (RLIMIT_NPROC=0 refuses them)."""
    code = ("import queue, threading\nfrom concurrent.futures import ThreadPoolExecutor\n\n"
            "def transform(grid):\n    q = queue.Queue()\n    lock, cond = threading.Lock(), threading.Condition()\n"
            "    def work(i):\n        with lock, cond:\n            cond.notify_all()\n        q.put(i)\n"
            "        return i * i % 10\n    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]\n"
            "    for t in threads:\n        t.start()\n    for t in threads:\n        t.join()\n"
            "    with ThreadPoolExecutor(3) as pool:\n        squares = list(pool.map(work, range(5)))\n"
            "    return [sorted(q.get() for _ in range(9))[:5], squares]\n")
    with Sandbox(n_jobs=1, limits=LIMITS, disable=("privilege_drop",)) as sb:
        _seccomp(sb)
        if os.geteuid() != 0:
            pytest.skip("threads need root (RLIMIT_NPROC=0 counts the user's processes)")
        result = sb.run(code, [[[1]]])
    assert result.outcome == Outcome.OK and result.outputs == [[[0, 0, 1, 1, 2], [0, 1, 4, 9, 6]]], result


# --- page-cache residency -----------------------------------------------------------------------


def test_page_cache_residency_is_hidden(sandbox: Sandbox, bare_sandbox: Sandbox) -> None:
    """preadv2(RWF_NOWAIT) and getrusage's fault counts told a program which file pages are
    cached (what the blocked mincore tells); plain preadv2 and reads still work."""
    _seccomp(sandbox)
    assert bare_sandbox.run(hostile("page_cache_probe"), [[[1]]]).outcome == Outcome.OK  # the probe works
    result = sandbox.run(hostile("page_cache_probe"), [[[1]]])
    assert result.outcome == Outcome.EXCEPTION and "gave nothing away" in (result.error or ""), result
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\ndef transform(grid):\n"
            "    buf = ctypes.create_string_buffer(8)\n    iov = (ctypes.c_uint64 * 2)(ctypes.addressof(buf), 8)\n"
            "    fd = os.open(os.__file__, os.O_RDONLY)\n"
            "    n = libc.syscall(ctypes.c_long(327), ctypes.c_long(fd), ctypes.byref(iov), ctypes.c_long(1),"
            " ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))\n"
            "    return [[n, int(buf.raw == os.pread(fd, 8, 0)), os.preadv(fd, [bytearray(8)], 0)]]\n")
    assert sandbox.run(code, [[[1]]]).outputs == [[[8, 1, 8]]]


# --- the OOM killer's choice ----------------------------------------------------------------------


def test_programs_are_the_oom_killers_first_choice() -> None:
    """Programs at their memory cap, n_jobs of them, must be killed before the trainer: they
    run with oom_score_adj 1000 and cannot lower it. Landlock is off so that /proc is readable."""
    with open("/proc/self/oom_score_adj") as handle:
        trainer = handle.read()
    with Sandbox(n_jobs=1, limits=LIMITS, disable=("landlock",)) as sb:
        assert sb.run(READ_OOM, [[[1]]]).outputs == [[[1, 0, 0, 0]]]
        result = sb.run(hostile("oom_score"), [[[1]]])
        assert result.outcome == Outcome.EXCEPTION and "stays 1000" in (result.error or ""), result
    with open("/proc/self/oom_score_adj") as handle:
        assert handle.read() == trainer


# --- a non-root trainer without Landlock ----------------------------------------------------------

_NON_ROOT = textwrap.dedent("""
    import ctypes, json, os, sys
    from fp16rl.sandbox import Sandbox, SandboxLimits
    libc = ctypes.CDLL(None)
    code, read_oom, flip, disable = json.loads(sys.stdin.read())
    report = {"uid": os.geteuid(), "dumpable_before": libc.prctl(3, 0, 0, 0, 0)}
    with Sandbox(n_jobs=2, limits=SandboxLimits(timeout_s=2.0, memory_mb=512), disable=disable) as sb:
        report["layers"] = sb.layers()
        report["dumpable_while_open"] = libc.prctl(3, 0, 0, 0, 0)
        theft = sb.run(code.replace("__TEST_PID__", str(os.getpid())), [[[1]]])
        report["theft"] = [theft.outcome.value, theft.error]
        report["oom"] = sb.run(read_oom, [[[1]]]).outputs
        report["flip"] = sb.run(flip, [[[1, 2]]]).outputs
    report["dumpable_after"] = libc.prctl(3, 0, 0, 0, 0)
    print(json.dumps(report))
""")


def _become_nobody() -> None:
    """In a child of a root test run: uid/gid 65534, keeping only CAP_DAC_READ_SEARCH, as an
    ambient capability that survives exec (so an interpreter installed under /root stays
    reachable). It does not open /proc/<pid>/fd, mem or environ: those check ptrace access,
    which a non-dumpable process grants only with CAP_SYS_PTRACE."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_keepcaps, pr_cap_ambient, raise_, cap = 8, 47, 2, 2
    libc.prctl(pr_set_keepcaps, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(1 << cap, 1 << cap, 1 << cap, 0, 0, 0)  # effective, permitted, inheritable
    if libc.capset(header, data) != 0 or libc.prctl(pr_cap_ambient, raise_, cap, 0, 0) != 0:
        os._exit(90)


@pytest.mark.parametrize("disable", [["landlock"], []], ids=["without-landlock", "with-landlock"])
def test_a_non_root_trainer_keeps_its_descriptors(disable: list[str]) -> None:
    """Non-root, programs run as the trainer's user; without Landlock nothing confines reads, and
    before issue 23 a program opened the trainer's pipes through /proc/<trainer>/fd read-only
    (a sibling's result) and read the fork server's memory. Run as uid 65534 when the tests
    run as root (see :func:`_become_nobody`), else as the current user. With Landlock, /proc
    stays unreadable and the trainer keeps being dumpable."""
    env = {"PATH": os.defpath, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    payload = json.dumps([hostile("proc_fd_theft", TEST_PID="__TEST_PID__"), READ_OOM, FLIP, disable])
    done = subprocess.run([sys.executable, "-c", _NON_ROOT], input=payload, capture_output=True, text=True, cwd="/",
                          env=env, timeout=120, check=False, preexec_fn=_become_nobody if os.geteuid() == 0 else None)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    layers = report["layers"]
    assert report["uid"] != 0 and layers["privilege_drop"].startswith("unavailable")
    assert report["theft"][0] == "exception" and "no descriptor" in report["theft"][1], report
    exposed = layers["landlock"] != "active" and layers["mount_namespace"] != "active"
    assert report["dumpable_while_open"] == (0 if exposed else 1), report
    assert report["dumpable_after"] == report["dumpable_before"] == 1
    assert report["flip"] == [[[2, 1]]]
    if exposed:  # /proc is readable: the program sees its own oom_score_adj
        assert report["oom"] == [[[1, 0, 0, 0]]]


_DUMPABLE = textwrap.dedent("""
    import ctypes, json
    from fp16rl.sandbox import OPTIONAL_LAYERS, Sandbox
    prctl = ctypes.CDLL(None).prctl
    seen = [prctl(3, 0, 0, 0, 0)]
    with Sandbox(n_jobs=1) as guarded:
        seen.append(prctl(3, 0, 0, 0, 0))
        with Sandbox(n_jobs=1, disable=OPTIONAL_LAYERS), Sandbox(n_jobs=1, disable=OPTIONAL_LAYERS) as bare:
            seen.append(prctl(3, 0, 0, 0, 0))
        seen.append(prctl(3, 0, 0, 0, 0))
    print(json.dumps([guarded.layers(), seen]))
""")


def test_the_trainer_gives_up_dumpability_only_while_programs_could_reach_it() -> None:
    """Only where nothing else keeps programs out of the trainer's /proc entries (no other uid,
    no Landlock, no view) is the trainer not dumpable (no core dumps, no same-user debugger),
    and only until the last such sandbox closes."""
    env = {"PATH": os.defpath, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", _DUMPABLE], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    layers, seen = json.loads(done.stdout)
    guarded = any(layers[name] == "active" for name in ("privilege_drop", "landlock", "mount_namespace"))
    assert seen == [1, 1 if guarded else 0, 0, 1 if guarded else 0], (layers, seen)
