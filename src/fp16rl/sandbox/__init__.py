"""Run untrusted, model-written ``transform(grid)`` programs on ARC grids, safely and fast.

The reward of the ARC workload is computed by running model-written code, so this package is
the security boundary of every ARC run: a program must not harm the host, leak anything, stop
the training run, or obtain a reward it did not earn (RL finds such holes on its own, and a
reward-hacked run looks like a success).

How it is put together
----------------------
* :mod:`.client` (trainer side): a pool of fork servers. Per program, two fresh pipes: the
  trainer writes the request (code and input grids) into one, reads at most
  ``max_output_bytes`` of JSON lines from the other, and parses them with the total, bounded
  parser of :mod:`.results` that re-checks every grid as plain JSON. The server's observation of how the child
  ended (exit status, signal, timeout) wins over anything the child wrote.
* :mod:`.server` (one per worker, a fresh ``python -I -m fp16rl.sandbox.server``, never a fork
  of the trainer): has imported numpy and a small preamble; per program its :mod:`.zygote`,
  forked before the first program, clones a child (the server's) from the same clean state. The
  child confines itself, then reads its own request: no program's code, inputs or results ever
  pass through the server, and the server's reports on programs never reach the zygote, whose
  memory later children inherit.
* :mod:`.confine`: every system-call-level layer (with the x86_64 seccomp table in
  :mod:`.syscalls` and the readable file set in :mod:`.readable`).
* :mod:`.grids`: code extraction and the two grid checks; :mod:`.common`: shared types;
  :mod:`.undumpable`: the trainer's /proc entries where no layer keeps programs out of them.

Layers (``Sandbox.layers()`` says which are active on this machine; config.yaml records it)
------------------------------------------------------------------------------------------
``rlimits`` (always): RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE=0, RLIMIT_NOFILE, RLIMIT_CORE=0,
RLIMIT_NPROC=0; setsid, closed descriptors, stdio on /dev/null, an empty environment; not
dumpable and oom_score_adj 1000 (server, zygote and programs).
``privilege_drop`` (root): uid/gid 65534, no capabilities.
``pid_namespace``: the server is PID 1 of its own namespace, each program PID 1 of one nested in
it; leftovers die with the program.
``net_namespace``: no interface up. ``ipc_namespace``: one per program (System V IPC and POSIX
message queues neither outlive a program nor connect two). ``mount_namespace``: the server
lives in a read-only view holding only the readable set and a private /proc.
``landlock``: read-only access to the readable set only; no TCP; signals scoped (ABI >= 6).
``seccomp``: an allow list of system calls (x86_64).

Each optional layer is probed once per worker and reported as ``"active"``, ``"disabled
(...)"`` or ``"unavailable: <reason>"``; an active layer that fails to apply in a child aborts
that program (fail closed). Layers can be forced off with ``Sandbox(disable=...)`` or
``FP16RL_SANDBOX_DISABLE=landlock,seccomp``. Needs Linux (fork, pipes, setrlimit) on x86_64,
aarch64, riscv64 or ppc64le (the zygote's clone(2) number).

Imports: ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows below it in pyproject.toml
[tool.importlinter]); not its sibling ``fp16rl.model``; never torch, transformers or peft (the light
contract: the fork server, a fresh ``python -I``, imports numpy and this package only).
"""

from fp16rl.sandbox.client import Sandbox
from fp16rl.sandbox.common import (
    DISABLE_ENV,
    OPTIONAL_LAYERS,
    ExecutionResult,
    Grid,
    Outcome,
    SandboxLimits,
)
from fp16rl.sandbox.grids import extract_code
from fp16rl.sandbox.results import interpret

__all__ = [
    "DISABLE_ENV",
    "OPTIONAL_LAYERS",
    "ExecutionResult",
    "Grid",
    "Outcome",
    "Sandbox",
    "SandboxLimits",
    "extract_code",
    "interpret",
]
