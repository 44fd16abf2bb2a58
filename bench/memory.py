"""Memory of one training forward + backward on SmolLM2-135M with 2,048-token rows, three ways:

  hidden-states  the trainer's logprobs before fp16rl kept only the last hidden state: a full model
                 forward with ``output_hidden_states=True`` (every layer's output stays alive);
  last-hidden    the backbone's last hidden state only (now), no gradient checkpointing;
  checkpointed   the same with ``--gradient-checkpointing``.

Each runs in a fresh process (so peaks do not mix); reported: the bytes autograd keeps for backward
(exact, counted with ``saved_tensors_hooks`` per storage: a tensor several operations save counts
once), docs/memory.md's prediction of them, and the peak resident memory above the loaded model of
the no-grad pass (pi_old) and of the forward + backward (sampled; see ``PeakRss``).

    .venv/bin/python bench/memory.py [--tokens 2048] [--rows 1] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import subprocess
import sys
import threading
import time

VARIANTS = ("hidden-states", "last-hidden", "checkpointed")


def measure(variant: str, tokens: int, rows: int, dtype: str) -> dict:
    import logging

    import torch

    from fp16rl.learner.logprobs import LogitHead, completion_logprobs

    from fp16rl.model.forward import TokenBatch
    from fp16rl.model.loading import LoraSettings, enable_gradient_checkpointing, load_trainer_model, model_folder
    from fp16rl.model.precision import PrecisionPolicy
    from fp16rl.learner.weights import MasterWeights

    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    policy = PrecisionPolicy.from_options(dtype)
    model = load_trainer_model(model_folder("smollm2-135m"), policy.trainer_dtype, LoraSettings(r=16, alpha=64))
    MasterWeights(model, policy)
    enable_gradient_checkpointing(model, variant == "checkpointed")
    completion = tokens // 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (rows, tokens), generator=generator)
    mask = torch.ones_like(ids)
    batch = TokenBatch(ids, mask, torch.arange(tokens).expand(rows, -1), ids[:, -completion:],
                       torch.ones(rows, completion, dtype=torch.bool))
    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved by several ops counts once

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def logprobs() -> torch.Tensor:
        if variant == "hidden-states":  # the former path: every layer's hidden state kept by the model output
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                        use_cache=False)
            hidden = out.hidden_states[-1][:, tokens - completion - 1: tokens - 1]
            logits = LogitHead.of(model)(hidden.reshape(-1, hidden.shape[-1])).float()
            return torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.reshape(-1, 1)), out
        return completion_logprobs(model, batch)

    with PeakRss() as no_grad, torch.no_grad():  # pi_old: the no-grad pass of every step
        logprobs()
    with PeakRss() as step, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = logprobs()
        logp.sum().backward()
    return {"variant": variant, "saved_gb": sum(saved.values()) / 1e9, "no_grad_peak_gb": no_grad.peak / 1e9,
            "step_peak_gb": step.peak / 1e9}


class PeakRss:
    """The largest resident memory above the block's start, sampled every 0.2 ms by a thread. The child
    runs with glibc's mmap threshold at 64 kB, so a freed tensor leaves the resident set at once."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.0002)

    def __enter__(self) -> "PeakRss":
        self.start = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def predicted_saved_gb(tokens: int, rows: int, checkpointed: bool) -> float:
    """docs/memory.md's activations kept for backward: ``A = s x (8 i + 26 h + 6 h_kv)`` bytes per layer
    without checkpointing; with it, each layer's input (``2 s h`` bytes; the one layer recomputed in
    backward is transient). SmolLM2-135M: h = 576, i = 1536, h_kv = 3 x 64, 30 layers."""
    hidden, intermediate, kv, layers = 576, 1536, 192, 30
    if checkpointed:
        return layers * 2 * tokens * hidden * rows / 1e9
    return layers * tokens * (8 * intermediate + 26 * hidden + 6 * kv) * rows / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.rows, args.dtype)))
        return
    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                              "--rows", str(args.rows), "--dtype", args.dtype], capture_output=True, text=True,
                             check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[1]
    print(f"SmolLM2-135M, LoRA r=16, {args.dtype}, {args.rows} row(s) x {args.tokens} tokens, one forward + backward")
    print("| variant | kept for backward (GB) | vs last-hidden | memory model (GB) | peak of the no-grad pass (GB) | "
          "peak of forward + backward (GB) | vs last-hidden |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        model = predicted_saved_gb(args.tokens, args.rows, r["variant"] == "checkpointed")
        print(f"| {r['variant']} | {r['saved_gb']:.3f} | {r['saved_gb'] / base['saved_gb']:.2f}x | {model:.3f} | "
              f"{r['no_grad_peak_gb']:.3f} | {r['step_peak_gb']:.3f} | {r['step_peak_gb'] / base['step_peak_gb']:.2f}x |")


if __name__ == "__main__":
    main()
