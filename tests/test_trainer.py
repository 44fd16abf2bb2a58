"""The RL loop end to end on the tiny model and the toy task."""

import json
import math

import pytest
import torch
import yaml

from fp16rl.core.errors import ConfigError
from fp16rl.model.precision import PrecisionError
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer
from support import toy_config

# Every per-step metric docs/design.md names that the toy task can produce.
DOC_METRICS = [
    "mismatch/token_kl_k1", "mismatch/token_kl_k3", "mismatch/seq_kl", "mismatch/logp_abs_diff_mean",
    "mismatch/logp_abs_diff_max", "mismatch/prob_abs_diff_mean", "mismatch/prob_abs_diff_max", "mismatch/prob_diff_min",
    "mismatch/prob_diff_max", "mismatch/is_ratio_token_min", "mismatch/is_ratio_token_mean",
    "mismatch/is_ratio_token_max", "mismatch/is_ratio_seq_min", "mismatch/is_ratio_seq_mean",
    "mismatch/is_ratio_seq_max", "mismatch/chi2_token", "mismatch/ess", "mismatch/pearson_prob",
    "mismatch/is_masked_ratio", "reward/mean", "reward/std", "reward/min", "reward/max", "reward/digits/mean",
    "completion/length_mean", "completion/length_max", "completion/truncated_ratio",
    "completion/unique_ngram_ratio_4", "policy/kl_ref", "policy/entropy", "policy/clip_ratio_low",
    "policy/clip_ratio_high", "optim/loss", "optim/grad_norm", "optim/lr", "optim/loss_scale", "optim/step_skipped",
    "optim/skipped_steps_total", "time/rollout_s", "time/reward_s", "time/train_s", "time/step_s",
    "throughput/rollout_tokens_per_s", "throughput/train_tokens_per_s",
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_toy_reward_rises(tmp_path, dtype):
    trainer = Trainer(toy_config(tmp_path / "run", dtype=dtype, max_steps=25))
    trainer.train(show_progress=False)
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > 0.4 and last > 3 * first, rewards
    report = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"]
    assert report["observed"]["sampler"]["compute_dtype"] == dtype
    assert report["observed"]["trainer"]["compute_dtype"] == dtype
    assert report["engines_agree"] is True


def test_run_outputs_and_metric_names(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", max_steps=2, beta=0.01, save_steps=1))
    trainer.train(show_progress=False)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    missing = [name for name in DOC_METRICS if name not in records[-1]]
    assert not missing, missing
    assert all(math.isfinite(records[-1][name]) for name in DOC_METRICS)
    assert records[-1]["mismatch/logp_abs_diff_max"] <= 1e-5  # float32 both sides
    assert list((run / "tb").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (run / "samples" / "step-000002.jsonl").read_text().splitlines()]
    assert len(samples) == 32  # every completion of the step: 4 prompts x 8 generations
    assert {"uid", "prompt", "completion", "rewards", "reward", "advantage", "finish_reason"} <= set(samples[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (run / "checkpoints" / "step-2" / "trainable.safetensors").is_file()


def test_lora_run_with_reference_kl(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="bfloat16", lora_r=4, lora_alpha=8, beta=0.1,
                                 learning_rate=1e-2, max_steps=2, save_steps=2))
    last = trainer.train(show_progress=False)
    # LoRA: the reference is the policy's own model with the adapters disabled, not a copy.
    assert trainer.reference.adapters and trainer.reference.model is trainer.model
    assert last["policy/kl_ref"] >= 0
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "adapter" / "adapter_config.json").is_file()
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert {p.dtype for p in frozen} == {torch.bfloat16}  # frozen base stored in the trainer dtype
    # half_copy: the model computes with bf16 adapters, AdamW updates their FP32 masters.
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in trainer.weights.masters} == {torch.float32}


def test_injected_fp16_overflow_skips_step(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="float16", max_steps=2))
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    handle = param.register_hook(lambda grad: grad * float("inf"))
    metrics = trainer.step(1)
    handle.remove()
    assert metrics["optim/step_skipped"] == 1.0 and metrics["optim/skipped_steps_total"] == 1.0
    assert metrics["optim/loss_scale"] == 2.0**15  # halved from 2^16
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, before[name]), name  # the skipped step changed nothing
    # The fused AdamW got the scaler's found_inf: no step counted, moments untouched.
    assert trainer.optimizer.defaults["fused"]
    states = list(trainer.optimizer.state.values())
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in states)
    metrics = trainer.step(2)
    assert metrics["optim/step_skipped"] == 0.0 and metrics["optim/skipped_steps_total"] == 1.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {1.0}


def test_bf16_nonfinite_gradient_skips_step(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="bfloat16", max_steps=1))
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    before = param.detach().clone()
    param.register_hook(lambda grad: grad * float("nan"))
    metrics = trainer.step(1)
    assert metrics["optim/step_skipped"] == 1.0 and torch.equal(param, before)


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def test_resume_is_exact(tmp_path):
    Trainer(toy_config(tmp_path / "full", max_steps=6, save_steps=3)).train(show_progress=False)
    Trainer(toy_config(tmp_path / "split", max_steps=6, save_steps=3)).train(show_progress=False)
    # Simulate a crash after step 4: the checkpoint of step 6 and records of steps 5-6 are lost.
    split = tmp_path / "split"
    import shutil

    shutil.rmtree(split / "checkpoints" / "step-6")
    lines = (split / "metrics.jsonl").read_text().splitlines()[:4]
    (split / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = Trainer(toy_config(split, max_steps=6, save_steps=3, resume=True, save_total_limit=5))
    assert resumed.start_step == 3
    resumed.train(show_progress=False)
    # config.yaml keeps a trace of what the resume changed, once, through the rewrite after its first step
    resumes = yaml.safe_load((split / "config.yaml").read_text())["resumes"]
    assert resumes == [{"at_step": 3, "changed": {"save_total_limit": [None, 5]}}]
    full = _comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    again = _comparable(read_metrics(split / "metrics.jsonl"))
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert full == again


def test_output_dir_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="in use"):
        Trainer(toy_config(out))
    assert (out / "notes.txt").read_text() == "precious"
    with pytest.raises(ConfigError, match="not an fp16rl run"):
        Trainer(toy_config(out, resume=True))


def test_undeclared_precision_disagreement_is_an_error(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="float16", max_steps=1))
    from fp16rl.rollout.sampler import cast_parameters

    cast_parameters(trainer.sampler.model, torch.bfloat16)  # a sampler that silently ignored --dtype
    with pytest.raises(PrecisionError, match="sampler matmuls computed in bfloat16, expected float16"):
        trainer.step(1)


def test_declared_ablation_runs(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="bfloat16", sampler_dtype="float16", max_steps=1))
    trainer.train(show_progress=False)
    report = trainer.precision_report
    assert report["observed"]["sampler"]["compute_dtype"] == "float16"
    assert report["observed"]["trainer"]["compute_dtype"] == "bfloat16"
    assert report["engines_agree"] is False


@pytest.mark.parametrize("overrides", [
    dict(num_iterations=2, is_correction="token_truncate", loss_type="grpo"),
    dict(importance_sampling_level="sequence", is_correction="sequence_mask", is_clip_max=10.0, loss_type="dr_grpo"),
    dict(gradient_accumulation_steps=4, loss_type="dapo", scale_rewards="batch", lr_scheduler_type="cosine",
         warmup_ratio=0.5),
])
def test_algorithm_variants_run(tmp_path, overrides):
    trainer = Trainer(toy_config(tmp_path / "run", max_steps=2, **overrides))
    last = trainer.train(show_progress=False)
    assert math.isfinite(last["optim/loss"]) and last["optim/step_skipped"] == 0.0


def test_is_reference_behaviour_corrects_against_the_distribution_sampled(tmp_path):
    """With top_p 0.8 the tokens are drawn from mu renormalised over the kept tokens. The mismatch metrics
    still compare the unprocessed mu (fp32: ~1e-7); sampling/* shows the processing: the ratio against the
    distribution sampled is the kept mass (pi_old = mu here). --is-reference behaviour feeds that ratio to
    the IS correction, which changes the loss but not the tokens or rewards."""
    runs = {}
    for reference in ("unprocessed", "behaviour"):
        trainer = Trainer(toy_config(tmp_path / reference, top_p=0.8, is_correction="token_truncate", is_clip_max=10.0,
                                     is_reference=reference, max_steps=1))
        runs[reference] = trainer.step(1)
        trainer.tracker.close()
    plain, corrected = runs["unprocessed"], runs["behaviour"]
    for metrics in (plain, corrected):
        assert metrics["mismatch/logp_abs_diff_mean"] < 1e-5
        assert 0.8 - 1e-5 <= metrics["sampling/kept_mass_min"] <= metrics["sampling/kept_mass_mean"] < 1.0
        assert metrics["sampling/behaviour_is_ratio_token_mean"] == pytest.approx(metrics["sampling/kept_mass_mean"],
                                                                                  abs=1e-4)
    assert plain["reward/mean"] == corrected["reward/mean"]
    assert plain["sampling/kept_mass_mean"] == corrected["sampling/kept_mass_mean"]  # the same tokens
    assert plain["optim/loss"] != pytest.approx(corrected["optim/loss"], rel=1e-3)
