"""Sampler throughput vs ``model.generate()``: same model, dtype, prompts and completion length.

Both sides sample (T=1, no top-p/top-k) exactly ``--new-tokens`` tokens per sequence: ours gets
an empty EOS list, ``generate`` gets ``min_new_tokens``. Rows: 8 and 32 distinct prompts with
one completion each, and the GRPO shape (4 prompts x 8 completions: our prefix sharing vs
``num_return_sequences``). Each engine is warmed up, then the repeats run round-robin across
engines (so a burst of load from other processes hits all of them) and the median is reported.

    .venv/bin/python bench/sampler.py [--model-path DIR] [--dtype float32|bfloat16|float16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from fp16rl.model.loading import load_model, load_tokenizer, tiny_model_path
from fp16rl.model.precision import dtype_name, parse_dtype
from fp16rl.rollout.sampler import Sampler, SamplingParams

# Prompt texts of varied length, so batches are left-padded as in real use.
TEXTS = [
    "Count from one to ten.",
    "Write a sequence of digits.",
    "Repeat the digits 1 2 3 4 5 6 7 8 9.",
    "Write a Python function `transform` that flips the grid left to right.",
    "The output is the input rotated by 90 degrees. Write the code using numpy.",
    "Black Blue Red Green Yellow Gray Pink Orange Purple Brown",
    "Below are several input and output examples of a transformation.",
    "0 0 0 1 1 1 2 2 2 3 3 3 4 4 4 5 5 5 6 6 6 7 7 7 8 8 8 9 9 9",
]
WORKLOADS = [("8 seqs", 8, 1), ("32 seqs", 32, 1), ("GRPO 4 prompts x 8", 4, 8)]


def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """``count`` chat prompts cycling through ``TEXTS`` (numbered so that repeats differ)."""
    prompts = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Task {i}. {TEXTS[i % len(TEXTS)]}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def hf_generate_runner(model, tokenizer, prompts: list[list[int]], n: int, new_tokens: int) -> Callable[[int], None]:
    """One ``model.generate`` call per invocation, forced to ``new_tokens`` new tokens per sequence."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")

    def run(seed: int) -> None:
        torch.manual_seed(seed)
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out.shape == (len(prompts) * n, batch["input_ids"].shape[1] + new_tokens)

    return run


def sampler_runner(sampler: Sampler, prompts: list[list[int]], n: int, new_tokens: int) -> Callable[[int], None]:
    """One ``Sampler.generate`` call per invocation; no EOS, so every row runs to ``new_tokens``."""
    params = SamplingParams(max_new_tokens=new_tokens)

    def run(seed: int) -> None:
        out = sampler.generate(prompts, n, params, seed=seed)
        assert bool(out.completion_mask.all()) and out.completion_ids.shape == (len(prompts) * n, new_tokens)

    return run


def median_seconds(runners: dict[str, Callable[[int], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each runner; repeats interleaved across runners."""
    for run in runners.values():
        for i in range(warmup):
            run(1000 + i)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(i)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="local HF model folder (default: the tiny test model)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (both sides)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). 1 gives stable timings on a loaded machine: "
        "OpenMP threads spin-waiting for a busy core make multi-threaded small-op timings erratic",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = parse_dtype(args.dtype)
    path = args.model_path or tiny_model_path()
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype).eval()
    samplers = {engine: Sampler(model, dtype, tokenizer.pad_token_id, [], engine=engine) for engine in ("hf", "fast")}

    print(
        f"model {path} | dtype {dtype_name(dtype)} | {args.new_tokens} new tokens | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | median of {args.repeats} after {args.warmup} warm-up\n"
    )
    print(
        "| workload | sequences | generate() tok/s | ours hf tok/s | ours fast tok/s "
        "| hf / generate | fast / generate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, num_prompts, n in WORKLOADS:
        prompts = prompt_ids(tokenizer, num_prompts)
        runners = {"generate": hf_generate_runner(model, tokenizer, prompts, n, args.new_tokens)}
        runners.update({engine: sampler_runner(s, prompts, n, args.new_tokens) for engine, s in samplers.items()})
        with torch.inference_mode():
            seconds = median_seconds(runners, args.warmup, args.repeats)
        tokens = num_prompts * n * args.new_tokens
        rate = {name: tokens / s for name, s in seconds.items()}
        print(
            f"| {label} | {num_prompts * n} | {rate['generate']:.0f} | {rate['hf']:.0f} | {rate['fast']:.0f} "
            f"| {rate['hf'] / rate['generate']:.2f}x | {rate['fast'] / rate['generate']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
