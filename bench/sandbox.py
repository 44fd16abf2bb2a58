"""Sandbox throughput vs one fresh Python subprocess per program, on ARC-shaped work.

Each program is a completion with a ```python block (flips, rotations, colour maps, tiling,
mostly numpy) run on a task of 3-5 random 10x10 train inputs plus 1 test input. The same
programs run through ``Sandbox(n_jobs=J)`` (pre-warmed fork servers) and through a baseline
that starts ``python -c`` per program (imports numpy, runs ``transform`` on every grid, prints
JSON), J at a time. Outputs of the two are compared, then a table and the speed-up printed.

    .venv/bin/python bench/sandbox.py [--programs 200] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from fp16rl.sandbox import Sandbox, SandboxLimits, extract_code

PROGRAMS = [
    "import numpy as np\n\ndef transform(grid):\n    return np.fliplr(np.array(grid)).tolist()\n",
    "import numpy as np\n\ndef transform(grid):\n    return np.flipud(np.array(grid)).tolist()\n",
    "import numpy as np\n\ndef transform(grid):\n    return np.rot90(np.array(grid), 1).tolist()\n",
    "import numpy as np\n\ndef transform(grid):\n    return np.rot90(np.array(grid), 2)\n",
    "import numpy as np\n\ndef transform(grid):\n    return np.array(grid).T\n",
    "import numpy as np\n\ndef transform(grid):\n    a = np.array(grid)\n    return np.where(a == 0, 5, a)\n",
    "import numpy as np\n\ndef transform(grid):\n    a = np.array(grid)[:5, :5]\n    return np.kron(a, np.ones((2, 2), dtype=int))\n",
    "def transform(grid):\n    swap = {1: 2, 2: 1, 3: 4, 4: 3}\n    return [[swap.get(v, v) for v in row] for row in grid]\n",
    "def transform(grid):\n    return [row[::-1] for row in grid[::-1]]\n",
    "from collections import Counter\n\ndef transform(grid):\n"
    "    top = Counter(v for row in grid for v in row).most_common(1)[0][0]\n"
    "    return [[top if v else 0 for v in row] for row in grid]\n",
]

BASELINE = """\
import json, sys
import numpy as np
request = json.loads(sys.stdin.read())
namespace = {}
exec(request["code"], namespace)
outputs = []
for grid in request["inputs"]:
    out = namespace["transform"]([list(row) for row in grid])
    outputs.append(np.asarray(out).tolist())
print(json.dumps(outputs))
"""


def make_jobs(n: int, seed: int = 0) -> list[tuple[str, list[list[list[int]]]]]:
    """n (completion, inputs) pairs: programs cycle, every task is a fresh random one."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        grids = [[[rng.randrange(10) for _ in range(10)] for _ in range(10)] for _ in range(rng.randint(3, 5) + 1)]
        completion = f"The rule is simple.\n```python\n{PROGRAMS[i % len(PROGRAMS)]}```\n"
        jobs.append((completion, grids))
    return jobs


def run_subprocess(completion: str, inputs: list) -> list | None:
    """The baseline: one fresh interpreter per program."""
    request = json.dumps({"code": extract_code(completion), "inputs": inputs})
    done = subprocess.run([sys.executable, "-c", BASELINE], input=request, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return json.loads(done.stdout) if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = make_jobs(args.programs)

    with Sandbox(n_jobs=args.jobs, limits=SandboxLimits()) as sandbox:
        layers = sandbox.layers()
        sandbox.run_many([(extract_code(c) or "", g) for c, g in jobs[: 2 * args.jobs]])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            ours = list(pool.map(lambda job: sandbox.run(extract_code(job[0]) or "", job[1]), jobs))
        ours_s = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        theirs = list(pool.map(lambda job: run_subprocess(*job), jobs))
    theirs_s = time.perf_counter() - start

    failed = sum(r.outcome.value != "ok" for r in ours)
    mismatched = sum(r.outputs != t for r, t in zip(ours, theirs))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("layers: " + ", ".join(f"{k}={v}" for k, v in layers.items()))
    print(f"{args.programs} programs, 4-6 grids of 10x10 each, {args.jobs} at a time; "
          f"sandbox failures: {failed}, outputs differing from baseline: {mismatched}")
    print(f"{'method':<34}{'seconds':>9}{'programs/s':>12}{'ms/program':>12}")
    for name, seconds in ((f"Sandbox(n_jobs={args.jobs})", ours_s), ("fresh `python -c` per program", theirs_s)):
        print(f"{name:<34}{seconds:>9.2f}{args.programs / seconds:>12.1f}{1000 * seconds / args.programs:>12.1f}")
    print(f"speed-up: {theirs_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
