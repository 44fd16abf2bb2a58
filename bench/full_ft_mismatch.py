"""Full fine-tuning mismatch of the tiny model: the sampler/trainer |dlogp| over a short toy run.

The trainer's arithmetic decides how much of the measured mismatch is precision and how much is the
trainer computing something else (an fp32 residual stream under autocast). Runs on any fp16rl
version with the same options, so an older checkout can be measured too:

    .venv/bin/python bench/full_ft_mismatch.py                      # this checkout (half_copy and autocast)
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/full_ft_mismatch.py   # e.g. a worktree of b8d8e29
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from fp16rl.config.options import TrainConfig
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer


def run(dtype: str, steps: int, seed: int, **extra) -> float:
    options = dict(model_path="tiny", dataset_path="toy:digits", dtype=dtype, lora_r=0, learning_rate=2e-3,
                   num_generations=8, prompts_per_step=4, max_completion_length=24, max_seq_length=256, beta=0.0,
                   max_grad_norm=1.0, warmup_ratio=0.0, max_steps=steps, save_steps=1000, top_p=1.0,
                   mask_truncated_completions=False, seed=seed, **extra)
    with tempfile.TemporaryDirectory() as folder:
        Trainer(TrainConfig(output_dir=str(Path(folder) / "run"), **options)).train(show_progress=False)
        records = read_metrics(Path(folder) / "run" / "metrics.jsonl")
    return float(np.mean([r["mismatch/logp_abs_diff_mean"] for r in records]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    paths = ["half_copy", "autocast"] if "trainer_compute" in {f.name for f in dataclasses.fields(TrainConfig)} \
        else ["this version's only path"]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"tiny model, full fine-tuning, toy:digits, {args.steps} steps, seeds {args.seeds}: mean |dlogp|")
    for path in paths:
        extra = {} if path.startswith("this") else {"trainer_compute": path}
        row = {dtype: np.mean([run(dtype, args.steps, s, **extra) for s in seeds]) for dtype in ("float16", "bfloat16")}
        print(f"{path:>24}: float16 {row['float16']:.2e}   bfloat16 {row['bfloat16']:.2e}")


if __name__ == "__main__":
    main()
