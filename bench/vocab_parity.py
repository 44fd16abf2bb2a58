"""The cost of full-vocabulary parity (``--vocab-parity-positions``): GRPO steps with the default setting
and with it off (0), side by side in one invocation.

Each setting runs as its own run on the same model, prompts and seed (the same completions: the parity
does not change a draw), one untimed warm-up step then ``--steps`` timed ones; ``--rounds`` repeats
both, alternating which goes first (a shared machine's speed drifts). Prints the median ``time/step_s``,
``time/rollout_s`` (the sampler keeps its rows while decoding) and ``time/train_s`` (the trainer's head on
the kept positions' hidden states, the float64 divergences), and the step-1 ``mismatch/vocab_kl``. On a
shared machine a step's time drifts by more than the parity costs, so the parity's own code is also
timed directly (``parity_s``: the sampler's ``VocabKeeper.offer`` calls, the trainer's tap, the metrics).

    python bench/vocab_parity.py --model tiny --steps 4 --rounds 3
    python bench/vocab_parity.py --model smollm2-135m --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fp16rl.measure.rollouts as rollouts_module
from fp16rl.config.options import TrainConfig
from fp16rl.measure.vocab import VocabParity
from fp16rl.rollout.vocab_rows import VocabKeeper
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

DEFAULT_POSITIONS = TrainConfig.__dataclass_fields__["vocab_parity_positions"].default


PARITY_S = [0.0]  # seconds spent in the parity's own code since the last reset


def timed(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            PARITY_S[0] += time.perf_counter() - start
    return wrapper


def instrument() -> None:
    """Time the parity's code: the keeper's offers, the trainer's tap, the metrics (a step's whole cost)."""
    VocabKeeper.offer = timed(VocabKeeper.offer)
    tap = VocabParity.tap
    VocabParity.tap = lambda self, begin: timed(tap(self, begin))
    rollouts_module.vocab_parity_metrics = timed(rollouts_module.vocab_parity_metrics)


def run(model: str, positions: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """``1 + args.steps`` GRPO steps; the timed steps' records (the warm-up's dropped)."""
    config = TrainConfig(model_path=model, dataset_path="toy:digits", output_dir=str(out), dtype=args.dtype,
                         lora_r=args.lora_r, num_generations=args.generations, prompts_per_step=args.prompts,
                         max_completion_length=args.tokens, max_steps=1 + args.steps, save_steps=10_000,
                         save_samples_steps=10_000, report_to=["none"], threads=args.threads, seed=0,
                         vocab_parity_positions=positions)
    trainer = Trainer(config)
    parity_s = []
    step = trainer.step

    def step_timed(*args: Any, **kwargs: Any) -> dict:
        PARITY_S[0] = 0.0
        metrics = step(*args, **kwargs)
        parity_s.append(PARITY_S[0])
        return metrics

    trainer.step = step_timed
    trainer.train(show_progress=False)
    return [{**r, "time/parity_s": s} for r, s in zip(read_metrics(out / "metrics.jsonl"), parity_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--positions", type=int, default=DEFAULT_POSITIONS)
    args = parser.parse_args()
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    instrument()
    records: dict[int, list[dict]] = {args.positions: [], 0: []}
    first_kl = None
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = [args.positions, 0] if round_ % 2 == 0 else [0, args.positions]
            for positions in order:
                got = run(args.model, positions, args, Path(tmp) / f"r{round_}-p{positions}")
                first_kl = got[0].get("mismatch/vocab_kl", first_kl)
                records[positions] += got[1:]
    print(f"model {args.model}, {args.dtype}, {'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}, "
          f"{args.prompts} x {args.generations} completions of <= {args.tokens} tokens, {args.threads} thread(s), "
          f"torch {torch.__version__}; median over {args.rounds} rounds x {args.steps} steps")
    print("| --vocab-parity-positions | step_s | rollout_s | train_s | mismatch_s | parity_s |")
    print("|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for positions, rows in records.items():
        medians[positions] = {k: statistics.median(r[f"time/{k}"] for r in rows)
                              for k in ("step_s", "rollout_s", "train_s", "mismatch_s", "parity_s")}
        m = medians[positions]
        print(f"| {positions} | {m['step_s']:.3f} | {m['rollout_s']:.3f} | {m['train_s']:.3f} | {m['mismatch_s']:.4f} "
              f"| {m['parity_s']:.4f} |")
    on, off = medians[args.positions]["step_s"], medians[0]["step_s"]
    parity = medians[args.positions]["parity_s"]
    print(f"step time on - off: {on - off:+.3f} s ({(on - off) / off:+.1%}); the parity's own code: {parity:.4f} s "
          f"a step ({parity / off:.2%} of the step off); step-1 mismatch/vocab_kl {first_kl:.3g}")


if __name__ == "__main__":
    main()
