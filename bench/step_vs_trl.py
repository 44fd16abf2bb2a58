"""A GRPO step of TRL's GRPOTrainer and of fp16rl, side by side in one invocation.

Same model, prompts (toy:digits, rendered with the model's chat template), reward (the share of digit
characters), group size, completion length and sampling (temperature 1, top_p 0.95), beta 0, one
prompt per step, full fine-tuning or LoRA (r=16 on the same modules), learning rate 1e-5, and
GRPOConfig's loss (dapo), clip (1.0), schedule (linear, no warm-up) and weight decay (0). Each engine
runs in its own process: one untimed warm-up step, then ``--steps`` timed ones; ``--rounds`` repeats
that per engine, alternating which goes first, since a shared machine's speed drifts over minutes.
The engines draw different random numbers, so their completions differ in length; ``--fixed-length``
makes every completion ``--completion-tokens`` long in both (the same work, token for token).
Prints the median s/step, completion tokens/s, fp16rl's rollout/train split, the share of its step
that the mismatch telemetry costs (``time/mismatch_s``: the no-grad recompute of pi_old and the
metrics) and the ratio of completion tokens/s. TRL computes no such telemetry.

    python bench/step_vs_trl.py --model smollm2-135m --dtypes float32 --modes full,lora --steps 4 --rounds 2
    python bench/step_vs_trl.py --model smollm2-135m --modes full,lora --steps 4 --threads 2 --max-staleness 0,1

``--max-staleness 0,1`` adds a row per K: fp16rl with asynchronous rollouts (its threads split between the
sampler process and the learner) against the same TRL run.

TRL on a CPU runs fp32 and bf16 (``bf16=True``: autocast); fp16 mixed precision needs a GPU there,
so fp16 rows show fp16rl alone.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fp16rl.config.options import DEFAULT_LORA_TARGETS, TrainConfig
from fp16rl.model.loading import load_tokenizer, model_folder
from fp16rl.tasks.toy import DigitsTask, digit_share
from fp16rl.training.trainer import Trainer

LEARNING_RATE, LORA_R, TOP_P = 1e-5, 16, 0.95
# fp16rl's settings where its defaults differ from GRPOConfig's, so both engines learn alike and draw
# completions of like lengths (completion tokens/s also measures what the policy learned to write).
TRL_DEFAULTS = {"loss_type": "dapo", "max_grad_norm": 1.0, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
                "weight_decay": 0.0}


def fp16rl_steps(model: str, dtype: str, lora: bool, args: argparse.Namespace, out: Path,
                 staleness: int = 0) -> list[dict[str, float]]:
    """fp16rl's steps; ``staleness``: --max-staleness (K >= 1: the sampler in its own process, the run's
    threads split between it and the learner)."""
    config = TrainConfig(model_path=model, dataset_path="toy:digits", output_dir=str(out), dtype=dtype,
                         lora_r=LORA_R if lora else 0, lora_alpha=2 * LORA_R, num_generations=args.generations,
                         prompts_per_step=1, max_completion_length=args.completion_tokens, beta=0.0, top_p=TOP_P,
                         learning_rate=LEARNING_RATE, mask_truncated_completions=False, **TRL_DEFAULTS,
                         max_steps=args.steps + 1, save_steps=10**6, report_to=["none"], seed=0,
                         max_staleness=staleness)
    trainer = Trainer(config)
    if args.fixed_length:  # no stop token: every completion is --completion-tokens long, as TRL's below
        trainer.sampler.eos_token_ids = trainer.sampler.eos_token_ids[:0]
    records = []
    for step in range(1, args.steps + 2):
        start = time.perf_counter()
        metrics = trainer.step(step)
        records.append({"s": time.perf_counter() - start, "tokens": metrics["completion/length_mean"] * args.generations,
                        "rollout": metrics["time/rollout_s"], "train": metrics["time/train_s"],
                        "telemetry": metrics["time/mismatch_s"] / metrics["time/step_s"]})
    if trainer.pipeline is not None:
        trainer.pipeline.close()
    trainer.tracker.close()
    return records[1:]


def trl_steps(model: str, dtype: str, lora: bool, args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(model)
    task = DigitsTask(tokenizer)
    prompts = [item.text for step in range(args.steps + 1) for item in task.batch(step, 1)]

    def digits(completions: list[str], **_: Any) -> list[float]:
        return [digit_share(c) for c in completions]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=args.generations,
                        num_generations=args.generations, max_completion_length=args.completion_tokens,
                        learning_rate=LEARNING_RATE, beta=0.0, top_p=TOP_P, temperature=1.0, max_steps=args.steps + 1,
                        logging_steps=1, report_to="none", save_strategy="no", bf16=dtype == "bfloat16",
                        model_init_kwargs={"dtype": torch.float32}, seed=0, disable_tqdm=True,
                        shuffle_dataset=False,  # fp16rl's prompt order: the same prompt at each step
                        generation_kwargs={"min_new_tokens": args.completion_tokens} if args.fixed_length else None)
    peft = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=list(DEFAULT_LORA_TARGETS)) if lora else None
    trainer = GRPOTrainer(model=str(model), reward_funcs=digits, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=peft,
                          callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # one log dict per step on stdout otherwise
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return [{"s": s, "tokens": n * args.generations} for s, n in zip(times, lengths)][1:]


def summary(records: list[dict[str, float]]) -> dict[str, float]:
    seconds = statistics.median(r["s"] for r in records)
    tokens = sum(r["tokens"] for r in records) / sum(r["s"] for r in records)
    phases = {k: statistics.median(r[k] for r in records) for k in ("rollout", "train", "telemetry") if k in records[0]}
    return {"s": seconds, "tps": tokens, "length": sum(r["tokens"] for r in records) / len(records), **phases}


def measure(engine: str, model: str, dtype: str, lora: bool, args: argparse.Namespace, out: Path
            ) -> list[dict[str, float]]:
    """One engine's steps in this (fresh) process: neither engine inherits the other's process state,
    such as fp16rl's allocator setting (``hardware.keep_freed_memory``) or TRL's trackio import."""
    torch.set_num_threads(args.threads)
    for name in ("fp16rl", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if engine == "trl" and args.trl_keep_freed_memory:
        from fp16rl.model.hardware import keep_freed_memory

        keep_freed_memory()
    if engine == "trl":
        return trl_steps(model, dtype, lora, args, out)
    return fp16rl_steps(model, dtype, lora, args, out, staleness=int(engine.partition("-k")[2] or 0))


def isolated(*call: Any) -> list[dict[str, float]]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *call).result()


def main(argv: list[str] | None = None) -> list[tuple[str, str, dict[str, float], dict[str, float] | None]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="tiny, or a prepared model (fp16rl models list)")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per engine, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each engine per configuration, alternating which goes first (fp16rl, TRL, TRL, "
                             "fp16rl, ...); each run warms up, then times --steps steps; the table pools them")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fixed-length", action="store_true",
                        help="every completion exactly --completion-tokens long in both engines (TRL: min_new_tokens; "
                             "fp16rl: no stop token), so both do the same work whatever they draw")
    parser.add_argument("--trl-keep-freed-memory", action="store_true",
                        help="give TRL's process fp16rl's allocator setting too (hardware.keep_freed_memory)")
    parser.add_argument("--max-staleness", default="0",
                        help="fp16rl's --max-staleness values, comma-separated (e.g. 0,1): one fp16rl row each")
    args = parser.parse_args(argv)
    stalenesses = [int(k) for k in args.max_staleness.split(",")]
    for name in ("steps", "rounds", "generations", "completion_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    model = str(model_folder(args.model))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                lora = mode == "lora"
                ours_names = ["fp16rl" if k == 0 else f"fp16rl-k{k}" for k in stalenesses]
                engines = ours_names + (["trl"] if dtype != "float16" else [])
                records: dict[str, list[dict[str, float]]] = {engine: [] for engine in engines}
                for round_ in range(args.rounds):  # ABBA: a drift of the machine's speed falls on both engines
                    for engine in engines if round_ % 2 == 0 else engines[::-1]:
                        records[engine] += isolated(engine, model, dtype, lora, args,
                                                    Path(folder) / f"{engine}-{dtype}-{mode}-{round_}")
                theirs = summary(records["trl"]) if "trl" in records else None
                for name in ours_names:
                    ours = summary(records[name])
                    label = mode if name == "fp16rl" else f"{mode}, K={name.partition('-k')[2]}"
                    rows.append((dtype, label, ours, theirs))
                    print(f"{dtype} {label}: fp16rl {ours['s']:.2f} s/step, TRL "
                          + (f"{theirs['s']:.2f} s/step" if theirs else "n/a"), flush=True)
    print(f"\n{args.model}, {args.generations} x {args.completion_tokens} tokens"
          f"{' (fixed length)' if args.fixed_length else ''}, {args.threads} thread(s), "
          f"median of {args.rounds} x {args.steps} steps, each run after a warm-up\n")
    print("| dtype | mode | TRL s/step | TRL tok/s | fp16rl s/step | fp16rl tok/s | rollout s | train s | "
          "telemetry share | tokens per completion (TRL / fp16rl) | s/step ratio | tok/s ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, mode, ours, theirs in rows:
        trl_cells = f"{theirs['s']:.2f} | {theirs['tps']:.1f}" if theirs else "n/a | n/a"
        lengths = (f"{theirs['length'] / args.generations:.1f} / " if theirs else "n/a / ") + \
            f"{ours['length'] / args.generations:.1f}"
        ratios = f"{theirs['s'] / ours['s']:.2f}x | {ours['tps'] / theirs['tps']:.2f}x" if theirs else "n/a | n/a"
        print(f"| {dtype} | {mode} | {trl_cells} | {ours['s']:.2f} | {ours['tps']:.1f} | {ours['rollout']:.2f} | "
              f"{ours['train']:.2f} | {ours['telemetry']:.1%} | {lengths} | {ratios} |")
    return rows


if __name__ == "__main__":
    main()
