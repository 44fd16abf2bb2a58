"""Where a sampler decode step's time goes: the torch profiler's table of one ``generate`` call (8
rows, fp32, one thread) after a warm-up, sorted by self CPU time (bench/RESULTS.md, "Where the time
goes").

    FP16RL_HOME=... .venv/bin/python bench/profile_decode.py smollm2-135m 16 0.95
    FP16RL_HOME=... .venv/bin/python bench/profile_decode.py tiny 128 1.0

Arguments: model (prepared name or folder), new tokens, top_p.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fp16rl.model.loading import load_model, load_tokenizer, model_folder
from fp16rl.rollout.sampler import Sampler, SamplingParams


def main() -> None:
    name, tokens, top_p = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    path = model_folder(name)
    tokenizer = load_tokenizer(path)
    sampler = Sampler(load_model(path), torch.float32, tokenizer.pad_token_id, [])
    prompts = [tokenizer(f"Task {i}: count from one to ten.")["input_ids"] for i in range(8)]
    params = SamplingParams(max_new_tokens=tokens, top_p=top_p)
    sampler.generate(prompts, 1, params, seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sampler.generate(prompts, 1, params, seed=1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
