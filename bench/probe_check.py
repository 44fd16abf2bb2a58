"""An independent check of ``fp16rl probe``: the same mismatch computed with plain transformers only.

Path (a), the inference engine: left-padded batch, prefill, then token by token through
``model(...)`` with a ``DynamicCache``, sampling with ``torch.multinomial`` at temperature 1 and
recording log_softmax(logits)[token] in fp32. Path (b), the trainer: one full forward over
prompt + completion. Both use one model whose weights are stored in the dtype (no autocast, no
fp16rl code: not its sampler, fast decoder, logprob or metric functions). Only the built-in prompt
texts are taken from fp16rl, so the numbers can be set next to a probe run on the same prompts.

    .venv/bin/python bench/probe_check.py [--model-path smollm2-135m] [--probe-json runs/.../probe.json]
        [--dtypes bfloat16,float16,float32] [--attn sdpa] [--batch-size 8] [--num-samples 16]
        [--max-new-tokens 128] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from fp16rl.probe import BUILTIN_PROMPTS


def model_folder(name: str) -> Path:
    """A folder, or a model prepared with `fp16rl models prepare` (looked up by hand, not through fp16rl)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    home = Path(os.environ.get("FP16RL_HOME", Path.home() / ".cache" / "fp16rl"))
    return home / "models" / name


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def decode_with_cache(model, ids, mask, max_new: int, eos: int, generator: torch.Generator):
    """Sample ``max_new`` tokens per row; returns tokens [B, T], their logprobs [B, T], real-token mask [B, T]."""
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True).logits[:, -1]
    next_position = mask.sum(-1)
    tokens, logprobs = [], []
    alive = torch.ones(ids.shape[0], dtype=torch.bool)
    real = []
    for step in range(max_new):
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        tokens.append(token)
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        real.append(alive.clone())
        alive &= token != eos
        if not alive.any() or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(real, 1)


@torch.no_grad()
def full_forward_logprobs(model, ids, mask, completion, completion_mask):
    """Logprobs of the completion tokens from one forward over prompt + completion."""
    input_ids = torch.cat([ids, completion], dim=1)
    attention = torch.cat([mask, completion_mask.long()], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    width = completion.shape[1]
    logp = torch.log_softmax(logits[:, ids.shape[1] - 1: ids.shape[1] - 1 + width].float(), dim=-1)
    return logp.gather(-1, completion[..., None]).squeeze(-1)


def check(folder: Path, dtype: torch.dtype, attn: str, batch_size: int, num_samples: int, max_new: int, seed: int):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = []
    for text in BUILTIN_PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    diffs = []
    for start in range(0, num_samples, batch_size):
        rows = [prompts[j % len(prompts)] for j in range(start, min(start + batch_size, num_samples))]
        ids, mask = left_pad(rows, pad)
        generator = torch.Generator().manual_seed(seed * 100_003 + start)
        tokens, mu, real = decode_with_cache(model, ids, mask, max_new, tokenizer.eos_token_id, generator)
        pi = full_forward_logprobs(model, ids, mask, tokens.masked_fill(~real, pad), real)
        diffs.append((pi - mu)[real])
    d = torch.cat(diffs)
    return {"mean": d.abs().mean().item(), "max": d.abs().max().item(), "tokens": d.numel(),
            "bitwise": (d == 0).double().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="smollm2-135m")
    parser.add_argument("--probe-json", help="probe.json of an `fp16rl probe` run to print beside")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    probe = {}
    if args.probe_json:
        for config in json.loads(Path(args.probe_json).read_text())["configs"]:
            if config["attn"] == args.attn and config["batch_size"] == args.batch_size:
                probe[config["dtype"]] = config["metrics"]
    folder = model_folder(args.model_path)
    print(f"model {folder}, attn {args.attn}, batch {args.batch_size}, {args.num_samples} samples x "
          f"<= {args.max_new_tokens} tokens, plain transformers (weights stored in the dtype)")
    print(f"{'dtype':9} {'tokens':>6} {'check mean|dlogp|':>18} {'check max':>10} {'bitwise':>8}   "
          f"{'probe mean|dlogp|':>18} {'probe max':>10} {'probe bitwise':>13}  time")
    for name in args.dtypes.split(","):
        t0 = time.perf_counter()
        r = check(folder, getattr(torch, name), args.attn, args.batch_size, args.num_samples, args.max_new_tokens,
                  args.seed)
        p = probe.get(name)
        theirs = (f"{p['mismatch/logp_abs_diff_mean']:18.3e} {p['mismatch/logp_abs_diff_max']:10.3e} "
                  f"{p['probe/bitwise_equal_ratio']:13.1%}" if p else f"{'-':>18} {'-':>10} {'-':>13}")
        print(f"{name:9} {r['tokens']:6d} {r['mean']:18.3e} {r['max']:10.3e} {r['bitwise']:8.1%}   {theirs}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
