"""What a second CPU thread buys a linear layer of SmolLM2-135M's shape, by rows: why TRL's step gains more
from ``--threads 2`` than fp16rl's synchronous one (bench/RESULTS.md, "Against TRL with 2 threads").

    .venv/bin/python bench/linear_threads.py --rows 8,64,350

Two regimes per row count, each timed with 1 and 2 torch threads:
- ``streamed``: ``--weights`` distinct ``[1536, 576]`` fp32 weights in turn (212 MB at 60), as a decode step
  reads every weight of the model once, from memory;
- ``resident``: one weight again and again (in cache), with ATen's ``F.linear`` (MKL), MKL's packed GEMM and
  oneDNN's linear, where this torch build has them.
8 rows is a decode step of 8 completions; a few hundred rows is a training forward over a batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def per_call_us(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean microseconds per call of ``fn`` (which makes ``calls`` calls)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def resident_kernels(x: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The linear kernels this build offers for ``x @ weight.T``, each as a call."""
    rows = x.shape[0]
    kernels: dict[str, Callable[[], object]] = {"F.linear": lambda: F.linear(x, weight)}
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        kernels["mkl packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
    except (AttributeError, RuntimeError):
        pass
    try:
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")
    except (AttributeError, RuntimeError):
        pass
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="8,64,350")
    parser.add_argument("--weights", type=int, default=60)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing of the resident weight")
    args = parser.parse_args()
    weights = [torch.randn(1536, 576) for _ in range(args.weights)]
    print("| rows | regime | kernel | 1 thread us | 2 threads us | speed-up |")
    print("|---:|---|---|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 576)
        cases = {("streamed", "F.linear"): (lambda: [F.linear(x, w) for w in weights], len(weights))}
        for name, kernel in resident_kernels(x, weights[0]).items():
            cases[("resident", name)] = (lambda kernel=kernel: [kernel() for _ in range(args.calls)], args.calls)
        for (regime, name), (fn, calls) in cases.items():
            timed = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                timed.append(per_call_us(fn, calls))
            print(f"| {rows} | {regime} | {name} | {timed[0]:.0f} | {timed[1]:.0f} | {timed[0] / timed[1]:.2f}x |")


if __name__ == "__main__":
    main()
