"""The GPU benchmark runs at a tiny shape on the CPU, so it is ready the day a GPU is at hand."""

import importlib.util
import math
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
    # The FLOP count of a step: 2 x params per token for the sampler's prefill and decode, the no-grad
    # pass and the forward, 4 x params for the backward, plus attention.
    assert bench.model_flops(100, 1, 1, 3, 2, 2, 1) == (2 * 100 * (3 + 4) + 2 * 2 * (25 - 9)) + 4 * (
        2 * 100 * 2 * 5 + 2 * 2 * 25)


def test_step_vs_trl_benchmark_runs_at_a_tiny_shape():
    """TRL's GRPOTrainer and fp16rl on the same tiny work: both engines report steps and tokens."""
    path = Path(__file__).resolve().parents[1] / "bench" / "step_vs_trl.py"
    spec = importlib.util.spec_from_file_location("step_vs_trl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--model", "tiny", "--steps", "1", "--generations", "2", "--completion-tokens", "8",
                       "--modes", "full", "--dtypes", "float32,float16"])
    assert [(dtype, mode) for dtype, mode, _, _ in rows] == [("float32", "full"), ("float16", "full")]
    (_, _, ours, theirs), (_, _, ours16, theirs16) = rows
    for summary in (ours, theirs, ours16):
        assert summary["s"] > 0 and summary["tps"] > 0
    assert ours["rollout"] > 0 and ours["train"] > 0 and 0 < ours["telemetry"] < 1
    assert theirs16 is None  # TRL has no fp16 on a CPU
