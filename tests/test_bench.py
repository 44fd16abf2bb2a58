"""The benchmarks run at a tiny shape on the CPU (GPU step, fp16rl vs TRL), so they cannot rot."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path


def test_gpu_step_benchmark_runs_at_a_tiny_shape(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--size", "tiny", "--steps", "1", "--dtypes", "float16,bfloat16", "--device", "cpu",
                          "--gradient-checkpointing", "--output-json", str(tmp_path / "out.json")])
    assert [r["dtype"] for r in results] == ["float16", "bfloat16"]
    for r in results:
        assert r["step_s"] > 0 and math.isfinite(r["completion_tokens_per_s"]) and r["peak_memory_gb"] > 0
        assert r["mfu"] is None and r["gradient_checkpointing"] is True  # no peak FLOPs known for a CPU
    assert (tmp_path / "out.json").is_file()
    # The FLOP count of a step: 2 x params per token for the sampler's prefill and decode and for the
    # training forward (the prompt once, then the completions), 4 x params for the backward, plus
    # attention (the prompt's once, each completion's over its whole sequence).
    sampler = 2 * 100 * (3 + 2 * 2) + 2 * 2 * (25 - 9)
    forward = 2 * 100 * (3 + 2 * 2) + 2 * 9 + 2 * 2 * (25 - 9)
    assert bench.model_flops(100, 1, 1, 3, 2, 2, 1) == sampler + 3 * forward == 5910


def test_half_linears_benchmark_runs_at_a_tiny_shape():
    """torch's half kernel against the widened linears: every table has its float32 floor and both dtypes."""
    path = Path(__file__).resolve().parents[1] / "bench" / "half_linears.py"
    done = subprocess.run([sys.executable, str(path), "--model", "tiny", "--rows", "2", "--tokens", "8",
                           "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith(("| float", "| bfloat"))]
    assert [r[0] for r in rows] == ["bfloat16"] * 2 + ["float16"] * 2 + ["float32", "bfloat16", "float16"] * 2
    matmuls, model, decode = rows[:4], rows[4:7], rows[7:]
    assert all(float(t) > 0 for r in matmuls for cell in r[2:] for t in cell.split(" / "))
    assert model[0][2] == "-" and all(r[3].endswith("x") and float(r[1]) > 0 for r in model[1:])
    assert all(float(cell) > 0 for r in decode[1:] for cell in r[1:])


def test_startup_benchmark_times_a_refusal_and_a_one_step_run():
    """bench/startup.py: both commands, each a fresh process of this checkout, with positive times."""
    path = Path(__file__).resolve().parents[1] / "bench" / "startup.py"
    done = subprocess.run([sys.executable, str(path), "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["refused train (--dtype float8)", "tiny model, 1 step"]
    for line in lines:
        wall, cpu = (float(line.split(key)[1].split()[0]) for key in ("wall", "cpu"))
        assert wall > 0 and cpu > 0, line


def step_vs_trl_rows(*options: str) -> list[list[str]]:
    """The table rows (cells stripped) of ``bench/step_vs_trl.py`` on the tiny model, 1 step of 2 x 8 tokens.
    In a subprocess: TRL imports trackio, which fixes its database folder when first imported."""
    path = Path(__file__).resolve().parents[1] / "bench" / "step_vs_trl.py"
    done = subprocess.run([sys.executable, str(path), "--model", "tiny", "--steps", "1", "--generations", "2",
                           "--completion-tokens", "8", "--modes", "full", "--rounds", "1", *options],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| float")]


def test_step_vs_trl_benchmark_runs_at_a_tiny_shape():
    """TRL's GRPOTrainer and fp16rl on the same tiny work: both engines report steps, tokens and a ratio.
    Every engine runs in a fresh process (~15-30 s of imports each here): float32 only, fp16rl at K = 0 and
    K = 1 beside one TRL run; the fp16 row (no TRL) is the next test's."""
    rows = step_vs_trl_rows("--dtypes", "float32", "--max-staleness", "0,1")
    assert [r[:2] for r in rows] == [["float32", "full"], ["float32", "full, K=1"]]
    fp32, fp32_async = rows
    assert fp32_async[2] == fp32[2] and float(fp32_async[4]) > 0  # the same TRL run; fp16rl's K=1 steps
    assert float(fp32[2]) > 0 and float(fp32[4]) > 0  # TRL's and fp16rl's s/step
    assert fp32[10].endswith("x") and fp32[11].endswith("x")  # the s/step and tok/s ratios
    assert all(0 < float(x) <= 8 for x in fp32[9].split("/"))  # tokens per completion (TRL, fp16rl): 1..8
    assert 0 < float(fp32[8].rstrip("%")) < 100  # the telemetry's share of the step


def test_step_vs_trl_without_trl_prints_n_a_for_it():
    """A dtype TRL cannot run on a CPU (fp16) gets fp16rl's figures and n/a for TRL's and the ratios."""
    rows = step_vs_trl_rows("--dtypes", "float16")
    assert [r[:2] for r in rows] == [["float16", "full"]]
    assert rows[0][2] == rows[0][3] == rows[0][10] == rows[0][11] == "n/a" and float(rows[0][4]) > 0


def test_python_in_bench_shell_scripts_imports_what_exists():
    """The Python heredocs of bench/*.sh run only on a lent GPU: their fp16rl imports are checked here, so a
    module moved by a refactor fails on a CPU, not in a session's scarce device time."""
    import importlib
    import re

    found, seen = [], 0
    for script in sorted((Path(__file__).parent.parent / "bench").glob("*.sh")):
        for module, names in re.findall(r"^\s*from (fp16rl[\w.]*) import ([\w, ]+)$", script.read_text(), re.M):
            imported, seen = importlib.import_module(module), seen + 1
            found += [(script.name, module, name.strip()) for name in names.split(",")
                      if not hasattr(imported, name.strip())]
    assert seen >= 1 and found == []  # gpu_session.sh reads its runs' metrics with read_metrics
