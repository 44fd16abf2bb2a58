"""Bounded memory without changing the result: completions per forward, gradient checkpointing,
generation in chunks, and a bounded number of checkpoints."""

from __future__ import annotations

import pytest
import torch

from fp16rl.runs.checkpoint import checkpoint_dirs
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

from support import toy_config


def first_step(tmp_path, name, **overrides):
    """Loss and the gradients of the first optimizer step (before AdamW), fp32."""
    trainer = Trainer(toy_config(tmp_path / name, max_steps=1, prompts_per_step=2, num_generations=4,
                                 **overrides))
    captured = {}
    step = trainer._optimizer_step

    def capture():
        captured["grads"] = [p.grad.detach().clone() for p in trainer.weights.params]
        return step()

    trainer._optimizer_step = capture
    metrics = trainer.step(1)
    return metrics, captured["grads"], trainer


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo", "dapo"])
def test_completions_per_forward_do_not_change_loss_or_gradients(tmp_path, loss_type):
    """The same loss and gradients for 1, 2 and 8 completions per trainer forward (GA 2: micro-batches of 4)."""
    results = [first_step(tmp_path, f"rows{rows}", loss_type=loss_type, gradient_accumulation_steps=2,
                          per_device_train_batch_size=rows, max_completion_length=12)
               for rows in (1, 2, 8)]
    (reference, grads, _), others = results[-1], results[:-1]
    assert reference["optim/loss_tokens"] > 0
    for metrics, other_grads, _ in others:
        # With one iteration the ratio is 1 and the loss is -mean(A) ~ 0: compare it absolutely.
        assert metrics["optim/loss"] == pytest.approx(reference["optim/loss"], abs=1e-6)
        assert metrics["policy/clip_ratio_low"] == pytest.approx(reference["policy/clip_ratio_low"], abs=1e-7)
        for a, b in zip(other_grads, grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_keeps_less_and_computes_the_same(tmp_path, lora_r):
    saved_bytes = {}
    results = {}
    for checkpointing in (False, True):
        trainer = Trainer(toy_config(tmp_path / f"gc{checkpointing}", max_steps=1, lora_r=lora_r, lora_alpha=8,
                                     gradient_checkpointing=checkpointing))
        assert trainer.gradient_checkpointing is checkpointing
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        captured = {}
        step = trainer._optimizer_step

        def capture(trainer=trainer, captured=captured, step=step):
            captured["grads"] = [p.grad.detach().clone() for p in trainer.weights.params]
            return step()

        trainer._optimizer_step = capture
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            metrics = trainer.step(1)
        saved_bytes[checkpointing], results[checkpointing] = total[0], (metrics, captured["grads"])
    assert saved_bytes[True] < 0.6 * saved_bytes[False], saved_bytes  # activations inside the layers not kept
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results[False], results[True]
    assert checkpointed["optim/loss"] == plain["optim/loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, checkpointed_grads))


def test_generating_in_chunks_changes_nothing(tmp_path):
    whole = Trainer(toy_config(tmp_path / "whole", max_steps=2))
    whole.train(show_progress=False)
    chunked = Trainer(toy_config(tmp_path / "chunked", max_steps=2, generation_batch_size=8))
    chunked.train(show_progress=False)

    def comparable(run):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    # 4 prompts x 8 generations decoded 8 rows (one prompt group) at a time: the same completions, so
    # the same rewards; logprobs and everything downstream agree to fp32 rounding.
    for a, b in zip(comparable("whole"), comparable("chunked")):
        for key in ("reward/mean", "completion/length_mean", "completion/truncated_ratio"):
            assert a[key] == b[key]
        assert a["optim/loss"] == pytest.approx(b["optim/loss"], rel=1e-4, abs=1e-7)


def test_save_total_limit_keeps_the_newest_and_the_resumed_one(tmp_path):
    Trainer(toy_config(tmp_path / "run", max_steps=4, save_steps=1, save_total_limit=2)).train(show_progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-3", "step-4"]
    resumed = Trainer(toy_config(tmp_path / "run", max_steps=7, save_steps=1, save_total_limit=1, resume=True))
    resumed.train(show_progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-4", "step-7"]  # step-4: resumed from
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


def test_cuda_devices_always_carry_their_index(monkeypatch):
    """torch refuses an index-less CUDA device in set_per_process_memory_fraction (found on an H200):
    ``cuda`` and ``auto`` resolve to ``cuda:<current>``, and an index past the last GPU is a clear error."""
    import torch

    from fp16rl.model.loading import ModelError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


def test_the_sampler_kv_budget_counts_rows_in_whole_prompt_groups(tiny_path):
    """--gpu-memory-utilization bounds the rows decoded at once on CUDA: 2 x layers x kv_heads x head_dim x
    element size bytes per position per row, rounded down to whole groups, at least one group; a shared
    prompt (--share-prompt-kv) is counted once per group."""
    import torch

    from fp16rl.model.loading import load_model
    from fp16rl.rollout.sampler import Sampler

    model = load_model(tiny_path, dtype=torch.float32)
    sampler = Sampler(model, torch.float16, pad_token_id=0, eos_token_ids=[1])
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 2
    assert sampler.kv_bytes_per_token() == per_token
    group = per_token * 4 * (60 + 40)  # 4 rows of a 60-token prompt + 40 new tokens
    assert sampler.rows_within(group * 3.5, 60, 40, 4) == 12  # 3 whole groups of 4
    assert sampler.rows_within(group * 3, 60, 40, 4) == 12
    assert sampler.rows_within(group * 2.99, 60, 40, 4) == 8
    assert sampler.rows_within(0, 60, 40, 4) == 4  # never less than one group
    assert sampler.rows_per_call(8, 0.3, [[1] * 60], 40, 4) == 8  # --generation-batch-size wins
    assert sampler.rows_per_call(None, 0.3, [[1] * 60], 40, 4) is None  # on a CPU: every row at once
    shared = Sampler(model, torch.float16, pad_token_id=0, eos_token_ids=[1], share_prompt_kv=True)
    assert shared.rows_within(per_token * (60 + 4 * 40) * 3, 60, 40, 4) == 12  # one prompt copy per group
