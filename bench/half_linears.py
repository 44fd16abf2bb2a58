"""Half-precision linears on a CPU without a half kernel: torch's fallback against ``widened_linear``
(fp16rl.model.half_matmul), side by side in one process, with float32 as the floor.

Three measurements:
- one linear layer at a model's shapes (decode rows and training rows): forward, input gradient and
  weight gradient, each as a single matmul;
- the model's training forward and backward over ``--rows`` x ``--tokens`` tokens (the loss: mean
  log-sum-exp of the logits), with every ``nn.Linear`` torch's own and then widened;
- the sampler (fast engine) decoding 2 prompts x 8 completions of ``--new-tokens`` tokens, the same
  three ways (torch's own, widened at every token as ``widened_linear``, widened once per call as the
  fast decoder does with ``widened_with``).

    python bench/half_linears.py --model smollm2-135m --rows 4 --tokens 32 --new-tokens 32 --threads 1

On a CPU that has the kernels (``emulated_dtypes()`` empty) the widened rows still run: they show what
the widening would cost there, which is why fp16rl does not widen on such a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from fp16rl.model.half_matmul import WidenedLinear, emulated_dtypes, widened_linear
from fp16rl.model.hardware import cpu_name
from fp16rl.model.loading import load_model, tiny_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``work`` over ``repeats`` calls after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_rows(dtype: torch.dtype, rows: int, width: int, out: int, repeats: int) -> list[float]:
    """Milliseconds of forward, input-gradient and weight-gradient matmuls: torch's own, then widened."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator).to(dtype)
    weight = torch.randn(out, width, generator=generator).to(dtype)
    grad = torch.randn(rows, out, generator=generator).to(dtype)
    native = [lambda: F.linear(x, weight), lambda: grad @ weight, lambda: grad.t() @ x]
    widened = [lambda: (x.float() @ weight.float().t()).to(dtype), lambda: (grad.float() @ weight.float()).to(dtype),
               lambda: (grad.float().t() @ x.float()).to(dtype)]
    return [1e3 * seconds(work, repeats) for work in native + widened]


def set_widened(model: torch.nn.Module, widened: bool) -> None:
    """Every linear torch's own ``nn.Linear`` or a ``WidenedLinear`` (the class alone changes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.__class__ = WidenedLinear if widened else torch.nn.Linear


def model_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids).logits.float().logsumexp(-1).mean().backward()
    return step


def decode_seconds(model: torch.nn.Module, dtype: torch.dtype, new_tokens: int, repeats: int) -> float:
    """Median seconds of one ``Sampler.generate`` of 2 prompts x 8 completions, no EOS."""
    from fp16rl.rollout.sampler import Sampler, SamplingParams

    sampler = Sampler(model, dtype, 0, [], engine="fast")
    prompts = [list(range(100, 140)), list(range(200, 230))]
    params = SamplingParams(max_new_tokens=new_tokens)
    return seconds(lambda: sampler.generate(prompts, 8, params, seed=0), repeats)


def decode_rows(model: torch.nn.Module, names: list[str], new_tokens: int, repeats: int) -> None:
    from fp16rl.rollout import fast_decode

    print(f"\nSampler decode, 2 prompts x 8 completions x {new_tokens} tokens, s (median of {repeats}):\n")
    print("| dtype | torch's own | widened per token | widened once per call |")
    print("|---|---:|---:|---:|")
    model.to(torch.float32)
    set_widened(model, False)
    print(f"| float32 | {decode_seconds(model, torch.float32, new_tokens, repeats):.2f} | - | - |")
    once = fast_decode.widened_with
    for name in names:
        set_widened(model, False)
        native = decode_seconds(model, DTYPES[name], new_tokens, repeats)
        set_widened(model, True)
        fast_decode.widened_with = lambda weight, bias: partial(widened_linear, weight=weight, bias=bias)
        try:
            per_token = decode_seconds(model, DTYPES[name], new_tokens, repeats)
        finally:
            fast_decode.widened_with = once
        widened = decode_seconds(model, DTYPES[name], new_tokens, repeats)
        print(f"| {name} | {native:.2f} | {per_token:.2f} | {widened:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"dtypes without a kernel here: {sorted(str(d) for d in emulated_dtypes()) or 'none'}")
    model = load_model(tiny_model_path() if args.model == "tiny" else args.model, torch.float32).train()
    width, out = model.config.hidden_size, model.config.intermediate_size
    print(f"\n{args.model} up_proj shapes ({width} -> {out}), ms per matmul (torch's own / widened):\n")
    print("| dtype | rows | forward | input grad | weight grad |")
    print("|---|---:|---:|---:|---:|")
    for name in args.dtypes.split(","):
        for rows in (8, args.rows * args.tokens * 4):
            t = layer_rows(DTYPES[name], rows, width, out, max(args.repeats, 5))
            print(f"| {name} | {rows} | {t[0]:.2f} / {t[3]:.2f} | {t[1]:.2f} / {t[4]:.2f} | {t[2]:.2f} / {t[5]:.2f} |")
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"\nTraining forward + backward, {args.rows} x {args.tokens} tokens, s (median of {args.repeats}):\n")
    print("| dtype | torch's own | widened | speed-up |")
    print("|---|---:|---:|---:|")
    floor = seconds(model_step(model, ids), args.repeats)
    print(f"| float32 | {floor:.2f} | - | - |")
    for name in args.dtypes.split(","):
        model.to(DTYPES[name])
        set_widened(model, False)
        native = seconds(model_step(model, ids), args.repeats)
        set_widened(model, True)
        widened = seconds(model_step(model, ids), args.repeats)
        print(f"| {name} | {native:.2f} | {widened:.2f} | {native / widened:.1f}x |")
    decode_rows(model, args.dtypes.split(","), args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
