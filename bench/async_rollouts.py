"""Asynchronous rollouts (``--max-staleness 1``) against the synchronous loop (``--max-staleness 0``), side
by side in one invocation, on the same machine, threads and options.

Two workloads:

- ``waiting``: a reward that waits on I/O (a judge model or a remote verifier: ``time.sleep``, which
  releases the GIL) for about as long as the rest of the step. The wait is calibrated first: the median
  step time of a short synchronous run without it (``--wait S`` sets it instead).
- ``cpu``: nothing waits; every phase computes on the CPU (each run gets ``--threads``; with K = 1 they
  are split between the sampler process and the learner).

Each run trains ``--steps`` steps; the figure is completion tokens per wall second from the end of step
1 to the end of the last step (step 1 pays the sampler process's start-up). Rewards come from
toy:digits (the share of digit characters), full fine-tuning or LoRA r=16, fp32.

    python bench/async_rollouts.py --model tiny --workloads waiting --steps 12
    python bench/async_rollouts.py --model smollm2-135m --workloads waiting,cpu --modes full,lora --steps 6
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.model.hardware import cpu_name
from fp16rl.model.loading import load_tokenizer, model_folder
from fp16rl.tasks import make_task
from fp16rl.training.trainer import Trainer


class WaitingReward:
    """The run's task whose reward waits ``seconds`` per scored batch before scoring, as a reward served
    over the network does."""

    def __init__(self, inner: Any, seconds: float):
        self.inner, self.seconds = inner, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return self.inner.score(*args, **kwargs)


def config_for(args: argparse.Namespace, out: Path, staleness: int, lora: bool, steps: int) -> TrainConfig:
    return TrainConfig(model_path=args.model, dataset_path="toy:digits", output_dir=str(out), dtype="float32",
                       lora_r=16 if lora else 0, lora_alpha=32, num_generations=args.generations,
                       prompts_per_step=args.prompts, max_completion_length=args.completion_tokens,
                       max_seq_length=1024, beta=0.0, top_p=0.95, learning_rate=args.learning_rate,
                       warmup_ratio=0.0, mask_truncated_completions=False, max_steps=steps, save_steps=10**6,
                       report_to=["none"], seed=0, threads=args.threads, max_staleness=staleness)


def run(args: argparse.Namespace, staleness: int, lora: bool, wait: float, steps: int) -> dict[str, float]:
    """Train ``steps`` steps; completion tokens per wall second after step 1, and the median step parts."""
    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(args, Path(tmp) / "run", staleness, lora, steps)
        task = make_task(config, load_tokenizer(model_folder(config.model_path)))
        trainer = Trainer(config, task=WaitingReward(task, wait) if wait else task)
        ends, records = [], []

        def log(step: int, metrics: dict[str, float], inner: Any = trainer.tracker.log) -> None:
            inner(step, metrics)
            ends.append(time.perf_counter())
            records.append(metrics)

        trainer.tracker.log = log
        trainer.train(show_progress=False)
    rows = args.prompts * args.generations
    tokens = sum(r["completion/length_mean"] * rows for r in records[1:])
    return {"tokens_per_s": tokens / (ends[-1] - ends[0]), "s_per_step": (ends[-1] - ends[0]) / (len(ends) - 1),
            "rollout_s": statistics.median(r["time/rollout_s"] for r in records[1:]),
            "train_s": statistics.median(r["time/train_s"] for r in records[1:]),
            "reward_s": statistics.median(r["time/reward_s"] for r in records[1:]),
            "wait_s": statistics.median(r.get("time/wait_s", 0.0) for r in records[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, or a prepared model (fp16rl models list)")
    parser.add_argument("--workloads", default="waiting", help="waiting and/or cpu (comma-separated)")
    parser.add_argument("--modes", default="full", help="full and/or lora (comma-separated)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--wait", type=float, default=None, help="the reward's wait in s (default: calibrated)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, {args.model}, fp32, {args.prompts} prompts x {args.generations} "
          f"completions of <= {args.completion_tokens} tokens, {args.steps} steps (throughput after step 1)", flush=True)
    for lora in [mode == "lora" for mode in args.modes.split(",")]:
        for workload in args.workloads.split(","):
            wait = 0.0
            if workload == "waiting":
                wait = args.wait if args.wait is not None else run(args, 0, lora, 0.0, 4)["s_per_step"]
            results = {k: run(args, k, lora, wait, args.steps) for k in (0, 1)}
            print(f"\n{workload} ({'LoRA' if lora else 'full'}; reward waits {wait:.2f} s per step)")
            for k, r in results.items():
                print(f"  K={k}: {r['tokens_per_s']:8.1f} completion tokens/s  {r['s_per_step']:.3f} s/step  (median "
                      f"rollout {r['rollout_s']:.3f} s, train {r['train_s']:.3f} s, reward {r['reward_s']:.3f} s, "
                      f"learner waiting {r['wait_s']:.3f} s)")
            print(f"  K=1 / K=0: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
