"""pi_old from the training forward (GRPO, one optimizer pass) gives the numbers of the separate no-grad
recompute: every logged metric and the trained weights, in fp32 (``fp16rl.measure.pi_old``)."""

import math

import pytest
import torch

from fp16rl.measure.rollouts import measure_rollouts
from fp16rl.training.trainer import Trainer
from fp16rl.runs.tracking import read_metrics
from support import toy_config


def _run(tmp_path, name: str, fused: bool, **options) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(toy_config(tmp_path / name, max_steps=3, **options))
    choose = trainer._pi_old_from_training
    trainer._pi_old_from_training = choose if fused else (lambda: False)
    trainer.train(show_progress=False)
    records = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
               for r in read_metrics(trainer.run_dir / "metrics.jsonl")]
    return trainer, records


@pytest.mark.parametrize("options", [
    # Token TIS on mu; every micro-batch one forward.
    dict(is_correction="token_truncate", is_clip_max=1.05),
    # Sequence masking on the behaviour distribution (top-p), forwards of 3 rows in micro-batches of 16
    # (the recompute splits the batch differently), truncated completions masked, the KL penalty.
    dict(is_correction="sequence_mask", is_clip_max=1.5, is_reference="behaviour", top_p=0.9,
         gradient_accumulation_steps=2, per_device_train_batch_size=3, mask_truncated_completions=True,
         max_completion_length=12, beta=0.04),
    # LoRA.
    dict(lora_r=8, lora_alpha=16, is_correction="token_mask", is_clip_max=1.2),
    # Every completion truncated and masked: no training forward, pi_old from a recompute after all.
    dict(max_completion_length=1, mask_truncated_completions=True, is_correction="token_truncate"),
], ids=["token-tis", "seq-mask-behaviour-ga2-rows3-kl", "lora", "empty-loss"])
def test_training_forward_gives_the_recompute_numbers(tmp_path, tiny_path, options):
    fused, with_fused = _run(tmp_path, "fused", True, **options)
    recomputed, with_recompute = _run(tmp_path, "recomputed", False, **options)
    assert len(with_fused) == 3
    if options.get("max_completion_length") == 1:  # a row is untruncated only if its one token is EOS
        assert any(r["optim/loss_tokens"] == 0 for r in with_fused[1:])
        assert all(r["mismatch/logp_abs_diff_mean"] < 1e-5 for r in with_fused)
    for a, b in zip(with_fused, with_recompute):
        assert a.keys() == b.keys()
        differ = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7)}
        assert not differ, f"step {a['step']}: {differ}"
    for x, y in zip(fused.weights.masters, recomputed.weights.masters):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_first_step_recomputes_and_later_steps_do_not(tmp_path, tiny_path, monkeypatch):
    """Step 1's recompute records the trainer's dtypes (the precision check); later GRPO steps skip it,
    while more passes per batch, online DPO and PPO keep it (their losses use pi_old before backward)."""
    calls: list[bool] = []

    def recording(*args, recompute=True, **kwargs):
        calls.append(recompute)
        return measure_rollouts(*args, recompute=recompute, **kwargs)

    monkeypatch.setattr("fp16rl.training.trainer.measure_rollouts", recording)
    Trainer(toy_config(tmp_path / "grpo", max_steps=3)).train(show_progress=False)
    assert calls == [True, False, False]
    for name, options in (("iters", dict(num_iterations=2)), ("dpo", dict(algorithm="online_dpo")),
                          ("ppo", dict(algorithm="ppo"))):
        calls.clear()
        Trainer(toy_config(tmp_path / name, max_steps=2, **options)).train(show_progress=False)
        assert calls == [True, True], name


def test_dropout_in_training_mode_keeps_the_recompute(tmp_path, tiny_path):
    """A random forward (LoRA dropout in training mode, say) cannot stand for pi_old."""
    trainer = Trainer(toy_config(tmp_path / "run", max_steps=1))
    trainer.train(show_progress=False)
    assert trainer._pi_old_from_training()
    trainer.model.add_module("extra_dropout", torch.nn.Dropout(0.1).eval())
    assert trainer._pi_old_from_training()  # in eval mode it is the identity
    trainer.model.extra_dropout.train()
    assert not trainer._pi_old_from_training()
