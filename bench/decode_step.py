"""Time of one sampler decode step (ms per token position) on a real model: the figure the top-p
candidates and the thread-count choice were measured with (bench/RESULTS.md, "Threads" and the
fp16rl-vs-TRL section).

    FP16RL_HOME=... .venv/bin/python bench/decode_step.py --model smollm2-135m --threads 1 --top-p 0.95

Rows are distinct prompts with one completion each, no stop token (every row decodes ``--tokens``
positions); the median of ``--repeats`` calls after a warm-up, divided by ``--tokens``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fp16rl.model.loading import load_model, load_tokenizer, model_folder
from fp16rl.rollout.sampler import Sampler, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a prepared model (fp16rl models list) or a folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = model_folder(args.model)
    tokenizer = load_tokenizer(path)
    sampler = Sampler(load_model(path), torch.float32, tokenizer.pad_token_id, [])
    prompts = [tokenizer(f"Task {i}: count from one to ten.")["input_ids"] for i in range(args.rows)]
    params = SamplingParams(max_new_tokens=args.tokens, top_p=args.top_p)
    sampler.generate(prompts, 1, params, seed=0)
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        sampler.generate(prompts, 1, params, seed=repeat + 1)
        times.append(time.perf_counter() - start)
    print(f"{path.name}: {args.rows} rows, top_p {args.top_p}, {args.threads} thread(s), OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}: {statistics.median(times) * 1000 / args.tokens:.1f} ms/token")


if __name__ == "__main__":
    main()
