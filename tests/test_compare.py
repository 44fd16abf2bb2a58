"""fp16rl compare: arms x seeds with paired randomness, resumable."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fp16rl.core.errors import ConfigError
from fp16rl.compare import parse_arm, plan_comparison, run_comparison
from fp16rl.runs.folders import arm_slug
from fp16rl.tasks.arc.synthetic import write_synthetic


def test_parse_arm_and_slug():
    arm = parse_arm("dtype=bfloat16, is-correction=token_truncate")
    assert arm.overrides == {"dtype": "bfloat16", "is_correction": "token_truncate"}
    assert arm_slug(arm.name) == "dtype=bfloat16__is-correction=token_truncate"
    for bad, match in [("dtype", "key=value"), ("seed=3", "not an option"), ("nope=1", "not an option"), ("", "sets nothing")]:
        with pytest.raises(ConfigError, match=match):
            parse_arm(bad)


def test_plan_validates_arms_and_refuses_other_comparisons(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match="unknown dtype"):
        plan_comparison(base, ["dtype=float8"], [0], tmp_path / "cmp")
    specs = plan_comparison(base, ["dtype=bfloat16", "dtype=float16"], [0, 1], tmp_path / "cmp")
    assert [(s.arm.name, s.seed) for s in specs] == [("dtype=bfloat16", 0), ("dtype=bfloat16", 1),
                                                     ("dtype=float16", 0), ("dtype=float16", 1)]
    assert specs[0].run_dir == tmp_path / "cmp" / "runs" / "dtype=bfloat16" / "seed-0"
    with pytest.raises(ConfigError, match="different comparison"):
        plan_comparison(base, ["dtype=bfloat16"], [0], tmp_path / "cmp")


@pytest.fixture(scope="module")
def arc_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmp")
    data, _ = write_synthetic(root / "lite.json.gz", num_tasks=8, seed=0, min_side=3, max_side=4)
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model_path": "tiny", "dataset_path": str(data), "grid_encoder": "digits", "lora_r": 0,
        "num_generations": 2, "prompts_per_step": 2, "max_completion_length": 8, "max_seq_length": 2048,
        "max_steps": 2, "save_steps": 1, "save_samples_steps": 1, "beta": 0.0, "n_jobs": 1, "top_p": 1.0,
    }))
    return base


def _prompts(run_dir: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted((run_dir / "samples").glob("step-*.jsonl")):
        rows += [(r["uid"], r["prompt"]) for r in map(json.loads, path.read_text().splitlines())]
    return rows


@pytest.mark.slow
def test_compare_pairs_seeds_and_resumes(arc_base, tmp_path):
    out = tmp_path / "cmp"
    events = []
    outcomes = run_comparison(arc_base, ["dtype=bfloat16", "dtype=float16"], [3], out,
                              on_event=lambda spec, event: events.append((spec.arm.name, event)))
    assert set(outcomes.values()) == {"finished"}, (outcomes, list((out / "logs").iterdir()))
    bf16, fp16 = out / "runs" / "dtype=bfloat16" / "seed-3", out / "runs" / "dtype=float16" / "seed-3"
    # Paired: the same seed gives both arms the same prompts, augmentations included.
    assert _prompts(bf16) and _prompts(bf16) == _prompts(fp16)
    for run, dtype in ((bf16, "bfloat16"), (fp16, "float16")):
        stored = yaml.safe_load((run / "config.yaml").read_text())
        assert stored["config"]["dtype"] == dtype and stored["config"]["seed"] == 3
        assert stored["precision"]["observed"]["sampler"]["compute_dtype"] == dtype
        assert json.loads((run / "summary.json").read_text())["arm"] == f"dtype={dtype}"

    # Interrupt the fp16 run after step 1: its summary and last checkpoint are gone.
    (fp16 / "summary.json").unlink()
    shutil.rmtree(fp16 / "checkpoints" / "step-2")
    kept_mtime = (bf16 / "metrics.jsonl").stat().st_mtime_ns
    events.clear()
    outcomes = run_comparison(arc_base, ["dtype=bfloat16", "dtype=float16"], [3], out,
                              on_event=lambda spec, event: events.append((spec.arm.name, event)))
    assert outcomes == {str(bf16): "kept", str(fp16): "finished"}
    assert ("dtype=float16", "resuming") in events and ("dtype=bfloat16", "kept") in events
    assert (bf16 / "metrics.jsonl").stat().st_mtime_ns == kept_mtime  # the finished arm was not re-run
    assert [json.loads(line)["step"] for line in (fp16 / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cli_accepts_several_arms_after_one_flag_and_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from fp16rl.cli import app

    base = tmp_path / "base.yaml"
    base.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 1\n")
    result = CliRunner().invoke(app, ["compare", "--config", str(base), "--arms", "dtype=float16", "dtype=float8",
                                      "--seeds", "0", "--output-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "unknown dtype 'float8'" in result.output  # the second arm was read
    assert not (tmp_path / "cmp" / "runs").exists()  # validated before anything ran
    result = CliRunner().invoke(app, ["compare", "--config", str(tmp_path / "missing.yaml"), "--arms", "dtype=fp16",
                                      "--output-dir", str(tmp_path / "cmp2")])
    assert result.exit_code == 2 and "missing.yaml not found" in result.output
    result = CliRunner().invoke(app, ["compare", "--config", str(base), "--arms", "dtype=fp16", "--seeds", "a,b",
                                      "--output-dir", str(tmp_path / "cmp3")])
    assert result.exit_code == 2 and "--seeds" in result.output


def test_parallel_runs_are_placed_one_per_gpu(monkeypatch):
    from fp16rl.compare import gpu_placement, visible_gpus

    assert gpu_placement(2, ["0", "1", "2"]) == ["0", "1"]  # one GPU per run
    assert gpu_placement(3, ["4", "6"]) == ["4", "6", "4"]  # more runs than GPUs: dealt round-robin
    assert gpu_placement(2, []) == [None, None]  # no GPU: the runs' environment is left alone
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]  # the names the user's CUDA_VISIBLE_DEVICES gave
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]


def test_an_interrupted_attempt_is_set_aside_never_deleted(tmp_path):
    from fp16rl.compare import aside_name

    run = tmp_path / "seed-0"
    for attempt in range(3):
        run.mkdir()
        (run / "metrics.jsonl").write_text(f"attempt {attempt}\n")
        run.rename(aside_name(run))
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["seed-0.incomplete", "seed-0.incomplete-2", "seed-0.incomplete-3"]
    assert (tmp_path / "seed-0.incomplete" / "metrics.jsonl").read_text() == "attempt 0\n"


def test_ctrl_c_stops_the_runs_in_progress_and_starts_no_other(tmp_path):
    """A Ctrl-C reaches compare alone (each run has a session of its own); compare passes it on once, so the
    running seed stops at a safe point with a checkpoint, the next seed never starts, and compare exits 130
    with a line saying how to resume. (Before, the next seed started as soon as the first had stopped.)"""
    import signal
    import subprocess
    import sys
    import time

    from fp16rl.runs.checkpoint import checkpoint_dirs
    from fp16rl.runs.tracking import read_metrics

    out = tmp_path / "cmp"
    compare = subprocess.Popen(
        [sys.executable, "-m", "fp16rl.cli", "compare", "--arms", "dtype=float32", "--seeds", "0,1", "--output-dir",
         str(out), "--model-path", "tiny", "--max-steps", "400", "--num-generations", "2", "--prompts-per-step", "2",
         "--max-completion-length", "8", "--report-to", "none"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    first = out / "runs" / "dtype=float32" / "seed-0"
    deadline = time.monotonic() + 300
    while not read_metrics(first / "metrics.jsonl") and time.monotonic() < deadline and compare.poll() is None:
        time.sleep(0.2)
    compare.send_signal(signal.SIGINT)
    output, _ = compare.communicate(timeout=300)
    assert compare.returncode == 130, output
    assert "seed 0: interrupted" in output and "seed 1" not in output
    assert "run the same command again to resume" in " ".join(output.split())
    done = len(read_metrics(first / "metrics.jsonl"))
    assert 1 <= done < 400 and [p.name for p in checkpoint_dirs(first)] == [f"step-{done}"]
    assert json.loads((first / "summary.json").read_text())["status"] == "interrupted"
    assert not (out / "runs" / "dtype=float32" / "seed-1").exists()
