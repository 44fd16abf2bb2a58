"""GRPO steps at a chosen shape: step time, tokens/s, peak memory and MFU, for fp16 and bf16.

Builds a random-weight Llama of the given size (presets or explicit dimensions), writes it as a model
folder, and runs real ``Trainer`` steps on prompts of exactly ``--prompt-tokens`` tokens with
``--generations`` completions of ``--completion-tokens`` (a random model rarely samples EOS, so the
completions run to full length). Meant for a GPU (the seed's shape: ``--size 8b --prompt-tokens 8600
--completion-tokens 1024 --generations 8 --lora-r 1``); the test suite runs it on the CPU at ``--size
tiny`` so it cannot rot.

    python bench/gpu_step.py --size 1b --prompt-tokens 8600 --completion-tokens 1024 --generations 8

MFU counts the model FLOPs the step needs, whatever the implementation computes: 2 x parameters per
token for every forward (the sampler's prefill and decode; the trainer's training forward, over the
prompt once and each completion: ``prompt + G x completion`` tokens), 4 x parameters for the
backward, plus the attention score and value products (``4 x s^2 x h x layers`` per sequence, half
of it causal), against the accelerator's dense peak (``--peak-tflops``; known for H100/H200). The
timed steps take pi_old from the training forward (no second pass), so none is counted. A run with
``--no-share-prompt-forward`` computes the prompt G times in the trainer; that is not counted as model
FLOPs, so its MFU is lower for the same work.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.core.seeds import derived_seed
from fp16rl.tasks.base import PromptItem
from fp16rl.core.scores import Scores
from fp16rl.training.trainer import Trainer

PRESETS = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 176, 512),
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor cores


class FixedLengthTask:
    """Prompts of exactly N tokens (a repeated special token) and a pseudo-random reward per completion."""

    name = "bench"

    def __init__(self, prompt_tokens: int, token: str):
        self.text = token * prompt_tokens

    num_steps_per_epoch = 1_000_000

    def batch(self, step: int, num_prompts: int) -> list[PromptItem]:
        return [PromptItem(text=self.text, uid=f"bench/{step}.{slot}") for slot in range(num_prompts)]

    def score(self, items: Sequence[PromptItem], completions: Sequence[str], truncated: Sequence[bool],
              completion_ids: Sequence[list[int]] | None = None, progress: Any = None) -> Scores:
        return Scores(rewards=[derived_seed(i, len(c)) % 1000 / 1000 for i, c in enumerate(completions)])

    def close(self) -> None:
        pass


def write_model(folder: Path, size: str, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp16rl.model.loading import build_tiny_tokenizer

    hidden, layers, heads, kv_heads, intermediate, vocab = PRESETS[size]
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=max(vocab, len(tokenizer)),
                         max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    # Built in ``dtype`` on the accelerator when there is one: an 8B model initialised in fp32 on the
    # CPU takes 32 GB and minutes.
    build_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with build_device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if build_device.type == "cuda":
        torch.cuda.empty_cache()


def model_flops(params: int, layers: int, hidden: int, prompt: int, completion: int, rows: int, iterations: int) -> float:
    """FLOPs of one step (see the module docstring)."""
    seq = prompt + completion
    completions_attention = 2 * layers * hidden * rows * (seq * seq - prompt * prompt)  # causal: half of 4 s^2 h
    sampler = 2 * params * (prompt + rows * completion) + completions_attention
    forward = 2 * params * (prompt + rows * completion) + 2 * layers * hidden * prompt * prompt + completions_attention
    return sampler + iterations * 3 * forward  # (forward + backward) per iteration


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB, the whole process


def run(args: argparse.Namespace, dtype: str, folder: Path) -> dict[str, Any]:
    options = dict(model_path=str(folder), dtype=dtype, lora_r=args.lora_r, lora_alpha=max(args.lora_r, 1) * 2,
                   num_generations=args.generations, prompts_per_step=1, max_completion_length=args.completion_tokens,
                   max_seq_length=args.prompt_tokens + args.completion_tokens + 1, beta=0.0, top_p=1.0,
                   mask_truncated_completions=False, max_steps=args.warmup_steps + args.steps, save_steps=10**9,
                   gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                   per_device_train_batch_size=args.per_device_train_batch_size, report_to=["none"],
                   share_prompt_forward=args.share_prompt_forward)
    gc.collect()  # the previous dtype's trainer, so that its memory is not counted in this one's peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig(output_dir=str(Path(out) / "run"), **options),
                          task=FixedLengthTask(args.prompt_tokens, "<|endoftext|>"))
        device = trainer.device
        for step in range(1, args.warmup_steps + 1):  # kernels, cuBLAS handles, the caching allocator
            trainer.step(step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, tokens, phases = [], 0, {"rollout_s": 0.0, "train_s": 0.0}
        for step in range(args.warmup_steps + 1, args.warmup_steps + args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            metrics = trainer.step(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            tokens += metrics["completion/length_mean"] * args.generations
            for phase in phases:
                phases[phase] += metrics[f"time/{phase}"] / args.steps
        config = trainer.model.config if hasattr(trainer.model, "config") else trainer.model.get_base_model().config
        params = sum(p.numel() for p in trainer.model.parameters())
        flops = model_flops(params, config.num_hidden_layers, config.hidden_size, args.prompt_tokens,
                            args.completion_tokens, args.generations, 1)
        seconds = sum(times) / len(times)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        trainer.tracker.close()
        return {"dtype": dtype, "device": name, "params": params, "step_s": seconds,
                "completion_tokens_per_s": tokens / sum(times), "peak_memory_gb": peak_memory(device),
                "mfu": flops / seconds / (peak * 1e12) if peak else None,
                "gradient_checkpointing": trainer.gradient_checkpointing, **phases,
                "mismatch_logp_abs_diff_mean": metrics["mismatch/logp_abs_diff_mean"],
                "mismatch_token_kl_k3": metrics["mismatch/token_kl_k3"]}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(PRESETS), default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (0: the timed step pays "
                        "for CUDA/cuBLAS start-up, about a second)")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--per-device-train-batch-size", type=int, default=None)
    parser.add_argument("--share-prompt-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="the trainer computes the prompt once for the G completions (fp16rl's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense fp16/bf16 peak of the accelerator")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    print(f"{args.size}: prompt {args.prompt_tokens} + {args.generations} x {args.completion_tokens} tokens, "
          f"LoRA r={args.lora_r}, {args.steps} timed step(s) after {args.warmup_steps} warm-up, prompt shared in "
          f"the trainer: {args.share_prompt_forward}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        write_model(Path(folder), args.size, torch.bfloat16)
        for dtype in args.dtypes.split(","):
            results.append(r := run(args, dtype, Path(folder)))
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"  {r['dtype']:>8} on {r['device']}: {r['step_s']:.2f} s/step (rollout {r['rollout_s']:.2f}, train "
                  f"{r['train_s']:.2f}), {r['completion_tokens_per_s']:.0f} completion tokens/s, peak "
                  f"{r['peak_memory_gb']:.2f} GB, MFU {mfu}, gradient checkpointing {r['gradient_checkpointing']}, "
                  f"|log pi - log mu| {r['mismatch_logp_abs_diff_mean']:.2e}", flush=True)
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
