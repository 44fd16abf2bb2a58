"""How paired are the bf16 and fp16 arms of one seed? The share of step-1 completions that are identical.

Both arms start from the same weights and draw with the same seed; they differ only in the sampler's
dtype. A completion stays identical as long as the same token wins every draw, so the share measures
how well the sampler's randomness is paired (and how far apart the two precisions' distributions are).
Uses only the API that every fp16rl version has, so the same script measures an older checkout:

    .venv/bin/python bench/pairing.py --model tiny
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/pairing.py --model tiny     # e.g. a worktree of b8d8e29
"""

from __future__ import annotations

import argparse
import time

import torch

from fp16rl.model.loading import load_model, load_tokenizer, resolve_model_path, tiny_model_path
from fp16rl.probe import BUILTIN_PROMPTS, encode_prompts
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.training.trainer import step_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, a prepared model name (smollm2-135m) or a folder")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = tiny_model_path() if args.model == "tiny" else resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    eos = sorted({tokenizer.eos_token_id, *([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int)
                                            else model.config.eos_token_id or [])} - {None})
    prompts = encode_prompts(list(BUILTIN_PROMPTS)[: args.prompts], tokenizer, True)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, top_p=args.top_p)
    started = time.perf_counter()
    identical, total, eos_rows, lengths_equal = 0, 0, 0, 0
    for seed in (int(s) for s in args.seeds.split(",")):
        arms = {}
        for dtype in (torch.bfloat16, torch.float16):
            sampler = Sampler(model, dtype, tokenizer.pad_token_id, eos)
            arms[dtype] = sampler.generate(prompts, args.generations, params, seed=step_seed(seed, 1))
        bf16, fp16 = (arms[d].completion_lists() for d in (torch.bfloat16, torch.float16))
        identical += sum(a == b for a, b in zip(bf16, fp16))
        lengths_equal += sum(len(a) == len(b) for a, b in zip(bf16, fp16))
        eos_rows += sum(r == "eos" for r in arms[torch.float16].finish_reasons)
        total += len(fp16)
    print(f"model {path.name} | {args.prompts} prompts x {args.generations} generations, <= {args.max_new_tokens} "
          f"tokens, top_p {args.top_p}, seeds {args.seeds} | {time.perf_counter() - started:.0f} s")
    print(f"identical completions bf16 vs fp16: {identical}/{total} = {identical / total:.1%}; "
          f"same length: {lengths_equal / total:.1%}; fp16 rows ended by EOS: {eos_rows / total:.1%}")


if __name__ == "__main__":
    main()
