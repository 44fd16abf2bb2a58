"""KV-buffer bytes and decode time per step of the fast decoder with and without ``share_prompt_kv``.

A randomly initialised model of SmolLM2-135M's shape (30 layers, hidden 576, 9 query heads on 3 KV
heads of 64, vocab 49152; nothing is downloaded) decodes ``--generations`` rows of one prompt of
``--prompt-tokens`` tokens, both ways in the same run: each way prefills once, then the two decode
the same random tokens step by step in alternation, so a burst of load from other processes hits
both. Reported: the bytes of the K/V buffers after the fan-out (from their shapes), the median time
of a decode step (one token for every row), and the largest logit difference between the two ways.

    .venv/bin/python bench/prompt_kv.py [--prompt-tokens 2048] [--generations 8] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fp16rl.rollout.fast_decode import LlamaFamilyDecoder
from fp16rl.model.precision import parse_dtype

SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                          max_position_embeddings=8192, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPE, attn_implementation="sdpa")).to(dtype).eval()
    prompt = torch.randint(1, SMOLLM2_135M_SHAPE["vocab_size"], (1, args.prompt_tokens))
    tokens = torch.randint(1, SMOLLM2_135M_SHAPE["vocab_size"], (args.new_tokens, args.generations))

    decoders, prefill_s = {}, {}
    with torch.inference_mode():
        for share in (False, True):
            decoder = LlamaFamilyDecoder(model, args.new_tokens, share_prompt_kv=share)
            start = time.perf_counter()
            decoder.prefill(prompt, torch.ones_like(prompt))
            prefill_s[share] = time.perf_counter() - start
            decoder.repeat_interleave(args.generations)
            decoders[share] = decoder
        step_s: dict[bool, list[float]] = {False: [], True: []}
        worst = 0.0
        for step in range(args.new_tokens):
            logits = {}
            for share, decoder in decoders.items():
                start = time.perf_counter()
                logits[share] = decoder.step(tokens[step])
                step_s[share].append(time.perf_counter() - start)
            worst = max(worst, (logits[False].float() - logits[True].float()).abs().max().item())

    print(f"SmolLM2-135M-shaped random model, {args.dtype}, 1 prompt x {args.prompt_tokens} tokens, "
          f"{args.generations} rows x {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median decode step after the first")
    print("| mode | KV buffers (MB) | prefill (s) | decode step (ms) | row tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for share, name in ((False, "copied per row"), (True, "share_prompt_kv")):
        median = statistics.median(step_s[share][1:])
        print(f"| {name} | {decoders[share].kv_bytes() / 1e6:.1f} | {prefill_s[share]:.2f} | {median * 1e3:.1f} "
              f"| {args.generations / median:.0f} |")
    print(f"max |logit difference| between the two: {worst:.2e}")


if __name__ == "__main__":
    main()
