"""The trainer's shared-prompt forward against the plain one on a device, per compute dtype.

For the tiny model (full fine-tuning and LoRA, gradient checkpointing on and off): the largest
difference of the completion logprobs and of the parameters' gradients (relative to each gradient's
largest entry) between ``share_prompts=True`` and the plain forward, in fp32 and under fp16/bf16
autocast. tests/test_prompt_forward.py checks the same on the CPU in fp32; this shows it on a GPU's
kernels (``bash bench/gpu_session.sh`` runs it), and how it compares with half precision's rounding.

    python bench/prompt_forward_check.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from fp16rl.learner.logprobs import completion_logprobs

from fp16rl.model.forward import build_token_batch
from fp16rl.model.loading import TinyModelSpec, enable_gradient_checkpointing, load_model, tiny_model_path


def measure(device: str, dtype: torch.dtype, lora: bool, checkpointing: bool) -> tuple[float, float]:
    runs = []
    for share in (False, True):
        model = load_model(tiny_model_path(TinyModelSpec())).to(device)
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        enable_gradient_checkpointing(model, checkpointing and share)
        draw = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, 512, (n,), generator=draw).tolist() for n in (40, 25)]
        completions = torch.randint(1, 512, (16, 32), generator=draw)
        mask = torch.arange(32)[None] < torch.randint(4, 33, (16, 1), generator=draw)
        batch = build_token_batch(prompts, 8, completions, mask, 0).to(device)
        context = (contextlib.nullcontext() if dtype == torch.float32
                   else torch.autocast(torch.device(device).type, dtype=dtype))
        with context:
            logprobs, _ = completion_logprobs(model, batch, share_prompts=share)
        logprobs.sum().backward()
        runs.append((logprobs.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (shared, shared_grads) = runs
    grad_error = max(((shared_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
                     for n, g in plain_grads.items())
    return (shared - plain).abs().max().item(), grad_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"shared vs plain trainer forward on {args.device}: max |d logprob|, max relative |d grad|")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for lora in (False, True):
            for checkpointing in (False, True):
                lp, grad = measure(args.device, dtype, lora, checkpointing)
                print(f"  {str(dtype)[6:]:>8} {'lora' if lora else 'full'} checkpointing={checkpointing!s:5}: "
                      f"{lp:.2e} {grad:.2e}", flush=True)


if __name__ == "__main__":
    main()
