"""What a command costs before it does its work: a refused ``fp16rl train`` (bad input, answered before torch
loads) and a whole one-step run of the tiny model (imports, model, sampler, one GRPO step, checkpoint), each
run ``--repeats`` times as a fresh ``python -m fp16rl.cli`` process, for one or more source trees side by side
(interleaved, so a busy machine slows each alike).

    python bench/startup.py                                   # this checkout
    git worktree add /tmp/old <commit>
    python bench/startup.py --src src --src /tmp/old/src      # against an older commit

Wall seconds and the process's CPU seconds (user + system, children included), median over the repeats.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "refused train (--dtype float8)": ["train", "--dtype", "float8"],
    "tiny model, 1 step": ["train", "--model-path", "tiny", "--max-steps", "1", "--report-to", "none"],
}


def timed(src: Path, args: list[str], workdir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one ``python -m fp16rl.cli ARGS`` process importing fp16rl from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    if "--model-path" in args:
        args = [*args, "--output-dir", tempfile.mkdtemp(dir=workdir)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fp16rl.cli", *args], env=env, cwd=workdir,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    expected = 2 if "float8" in args else 0
    if result.returncode != expected:
        raise SystemExit(f"{src}: {' '.join(args)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, help="a source tree (its src/ folder); repeatable")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources = args.src or [Path(__file__).resolve().parent.parent / "src"]
    with tempfile.TemporaryDirectory() as folder:
        for name, command in COMMANDS.items():
            samples: dict[Path, list[tuple[float, float]]] = {src: [] for src in sources}
            for _ in range(args.repeats):
                for src in sources:  # interleaved: load on the machine falls on every tree alike
                    samples[src].append(timed(src, command, Path(folder)))
            for src, runs in samples.items():
                wall = statistics.median(w for w, _ in runs)
                cpu = statistics.median(c for _, c in runs)
                print(f"{name:32s} {str(src):28s} wall {wall:6.2f} s   cpu {cpu:6.2f} s   ({args.repeats} runs)")


if __name__ == "__main__":
    main()
