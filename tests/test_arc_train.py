"""The issue's acceptance run: fp16 GRPO on arc-lite with the warm-started tiny model raises the reward."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fp16rl.config.options import TrainConfig
from fp16rl.tasks.arc.lite import ARC_LITE_RL_OPTIONS, arc_lite_dataset
from fp16rl.tools.arc_lite import arc_lite_warm_model
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# The tests that use the arc-lite warm model (built once per session, ~3 min) share one xdist worker.
WARM_MODEL = pytest.mark.xdist_group("arc_lite_warm_model")


@pytest.mark.slow
@WARM_MODEL
def test_arc_lite_reward_rises_in_fp16(tmp_path: Path, fp16rl_home: Path) -> None:
    run = tmp_path / "run"
    config = TrainConfig(model_path=str(arc_lite_warm_model()), dataset_path=str(arc_lite_dataset()),
                         output_dir=str(run), seed=0, **ARC_LITE_RL_OPTIONS)
    Trainer(config).train(show_progress=False)
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == ARC_LITE_RL_OPTIONS["max_steps"]
    rewards = [r["reward/mean"] for r in records]
    first, last = mean(rewards[:5]), mean(rewards[-10:])
    # Measured at 094e84e (AMD EPYC) on seeds 0-3: first five steps 1.14-2.10, last ten 2.99-4.41, rises of
    # +0.89..+2.46 (x1.42..x3.05); a slow seed (2) stays flat until step 10, so the last ten steps are
    # compared, not the last five (which dipped to 2.93 on that seed).
    assert last > first + 0.5 and last > 1.25 * first, rewards
    # The warm start is what makes RL possible here: most completions hold a parseable program.
    parse_errors = [r["code/parse_error_ratio"] for r in records]
    assert mean(parse_errors[:5]) < 0.5 and mean(parse_errors) < 0.5, parse_errors
    assert max(r["reward/solved_ratio"] for r in records[-5:]) > 0
    precision = yaml.safe_load((run / "config.yaml").read_text())["precision"]
    assert precision["engines_agree"] is True
    observed = precision["observed"]
    assert observed["sampler"]["compute_dtype"] == observed["trainer"]["compute_dtype"] == "float16"


@pytest.mark.slow
@WARM_MODEL
def test_seed_command_line_runs(tmp_path: Path, fp16rl_home: Path) -> None:
    """The seed's exact command line (README, "The seed's bf16-vs-fp16 experiment"), paths replaced by the warm tiny model and arc-lite."""
    import shlex
    import subprocess
    import sys

    run = tmp_path / "run"
    command = (
        "--dtype bfloat16 --beta 0.001 --no-load-in-4bit --reward-name arc-v2-no-pixel-score --num-generations 8 "
        "--gradient-accumulation-steps 1 --learning-rate 4e-6 --lora_r 1 --repetition-penalty 1.00 --epochs 1 "
        "--mask-truncated-completions --scale-rewards batch --gpu_memory_utilization 0.3 --warmup-ratio 0.001 "
        "--max-seq-length 9700 --max-completion-length 1024 --n-jobs 20 "
        f"--model-path {arc_lite_warm_model()} --dataset-path {arc_lite_dataset()} --output-dir {run}"
    )
    result = subprocess.run([sys.executable, "-m", "fp16rl.cli", "train", *shlex.split(command)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one epoch of the 4-task set, one task per step
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["config"]["lora_r"] == 1 and stored["config"]["scale_rewards"] == "batch"
    assert stored["precision"]["observed"]["sampler"]["compute_dtype"] == "bfloat16"
    assert stored["task_details"]["sandbox_layers"]["rlimits"] == "active"
