"""IS ratio statistics against the unprocessed mu and against the distribution actually sampled (top-p).

With top-p (or top-k, or a repetition penalty) the sampler draws from a processed distribution
``mu_b``; the mismatch metrics compare the unprocessed ``mu`` with the trainer's ``pi`` (the precision
question). This runs a model (the tiny one by default) on the toy task with ``--top-p 0.8`` in each
dtype and prints, per run, the token IS ratio ``pi_old / mu`` (``mismatch/is_ratio_token_*``) next to ``pi_old / mu_b``
(``sampling/behaviour_is_ratio_token_*``) and the kept mass, averaged over the steps.

    python bench/is_reference.py --steps 5
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.training.trainer import Trainer

KEYS = ("is_ratio_token_min", "is_ratio_token_mean", "is_ratio_token_max")


def run(model: str, dtype: str, steps: int, top_p: float, folder: Path) -> dict[str, float]:
    config = TrainConfig(model_path=model, dataset_path="toy:digits", output_dir=str(folder / dtype), dtype=dtype,
                         lora_r=0, learning_rate=2e-3, num_generations=8, prompts_per_step=4, max_completion_length=24,
                         max_seq_length=256, beta=0.0, top_p=top_p, max_steps=steps, save_steps=10**6,
                         mask_truncated_completions=False, seed=0, report_to=["none"])
    trainer = Trainer(config)
    records = [trainer.step(step) for step in range(1, steps + 1)]
    trainer.tracker.close()
    keys = [f"mismatch/{k}" for k in KEYS] + [f"sampling/behaviour_{k}" for k in KEYS] + [
        "sampling/kept_mass_mean", "sampling/kept_mass_min", "mismatch/logp_abs_diff_mean"]
    return {key: sum(r[key] for r in records) / len(records) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, or a prepared model (fp16rl models list)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    args = parser.parse_args()
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    print(f"{args.model}, toy:digits, top_p {args.top_p}, {args.steps} steps of 4 x 8 completions; means over steps\n")
    print("| dtype | pi/mu min | pi/mu mean | pi/mu max | pi/mu_b min | pi/mu_b mean | pi/mu_b max | kept mass mean | kept min | mean abs dlogp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes.split(","):
            m = run(args.model, dtype, args.steps, args.top_p, Path(folder))
            cells = [m[f"mismatch/{k}"] for k in KEYS] + [m[f"sampling/behaviour_{k}"] for k in KEYS]
            print(f"| {dtype} | " + " | ".join(f"{v:.4f}" for v in cells)
                  + f" | {m['sampling/kept_mass_mean']:.4f} | {m['sampling/kept_mass_min']:.4f}"
                  + f" | {m['mismatch/logp_abs_diff_mean']:.2e} |")


if __name__ == "__main__":
    main()
