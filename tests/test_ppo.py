"""PPO with a critic (--algorithm ppo): GAE, whitening, the clipped losses against hand computations and TRL's
loop, the options, the metrics every step in fp16 and bf16 with LoRA and full fine-tuning, exact resume, learning."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fp16rl.algo.grpo import LossSettings
from fp16rl.algo.batch import RolloutBatch
from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import build_parser
from fp16rl.core.errors import ConfigError
from fp16rl.compare import plan_comparison
from fp16rl.algo.ppo import (clipped_value_loss, explained_variance, gae, masked_whiten, ppo_policy_loss, ppo_value_loss,
                        token_rewards)
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

from support import assert_resume_is_exact, assert_toy_reward_rises, toy_config


def ppo_config(out, **overrides) -> TrainConfig:
    return toy_config(out, **{"algorithm": "ppo", **overrides})


# --- formulas ---------------------------------------------------------------------------------------


def test_gae_and_returns_equal_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 9.0, 9.0]])  # the padding's values must not count
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, backwards: delta2 = 1 - 0.4 = 0.6; delta1 = 0.9*0.4 - 0.2 = 0.16, A1 = 0.16 + 0.72*0.6 = 0.592;
    # delta0 = 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.72*0.592 = 0.10624. Row 1: A0 = 0.5 - 0.3 = 0.2 (V_1 = 0).
    assert advantages.tolist()[0] == pytest.approx([0.10624, 0.592, 0.6], abs=1e-6)
    assert advantages.tolist()[1] == pytest.approx([0.2, 0.0, 0.0], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.60624, 0.792, 1.0], abs=1e-6)
    assert returns.tolist()[1] == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)


def _trl_gae(rewards, values, gamma, lam):
    """TRL's PPOTrainer.train loop (its ppo_trainer.py), transcribed: values already masked to 0."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_trl_transcription(gamma, lam):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = torch.arange(5)[None] < lengths[:, None]
    rewards = torch.randn(4, 5) * mask
    values = torch.randn(4, 5) * mask
    ours = gae(rewards, values, mask, gamma, lam)
    theirs = _trl_gae(rewards, values, gamma, lam)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b * mask, atol=1e-6)


def test_token_rewards_put_the_score_last_and_the_k1_penalty_on_every_token():
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.25, 7.0, 7.0], [0.0, 0.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([1.0, 0.5, 2.0]), mask, old, ref, beta=0.1)
    assert kl.tolist()[0] == pytest.approx([0.5, 0.0, -1.0])
    assert rewards.tolist() == [pytest.approx([-0.05, 0.0, 1.1]), pytest.approx([0.525, 0.0, 0.0]), [0.0, 0.0, 0.0]]
    plain, _ = token_rewards(torch.tensor([1.0, 0.5, 2.0]), mask, old, None, beta=0.1)
    assert plain.tolist() == [[0.0, 0.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_whitening_by_hand_and_as_trl():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(5 / 3 + 1e-8)  # unbiased variance of 1..4 = 5/3
    expected = [[(1 - 2.5) / std, (2 - 2.5) / std, (3 - 2.5) / std], [(4 - 2.5) / std, 0.0, 0.0]]
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx(expected[0], rel=1e-6)
    assert masked_whiten(x, mask).tolist()[1] == pytest.approx(expected[1], rel=1e-6)
    # TRL: masked_mean/masked_var(unbiased)/rsqrt(var + 1e-8), then masked_fill(padding, 0)
    m = mask.float()
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) ** 2) * m).sum() / m.sum() * m.sum() / (m.sum() - 1)
    assert torch.allclose(masked_whiten(x, mask), ((x - mean) * torch.rsqrt(var + 1e-8)) * m)


def test_clipped_value_loss_by_hand_and_as_trl():
    values = torch.tensor([[0.5, 0.1, -0.5, 0.45]])
    old = torch.tensor([[0.1, 0.1, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.5, 0.5]])
    loss, clipped = clipped_value_loss(values, old, returns, 0.2)
    # 0.5*max((V-R)^2, (clip(V, V_old-0.2, V_old+0.2)-R)^2): 0.5*max(.25,.09); 0.5*.81; 0.5*max(1,.49); 0.5*max(.0025,.09)
    assert loss.tolist()[0] == pytest.approx([0.125, 0.405, 0.5, 0.045])
    assert clipped.tolist()[0] == [False, False, False, True]
    # TRL: vpredclipped = clamp(vpred, mb_values - c, mb_values + c); vf_loss = 0.5 * masked_mean(max(...))
    vpredclipped = torch.clamp(values, old - 0.2, old + 0.2)
    trl = torch.max(torch.square(values - returns), torch.square(vpredclipped - returns))
    assert torch.allclose(loss, 0.5 * trl)
    batch = RolloutBatch(tokens=None, advantages=torch.zeros(1, 4), loss_mask=torch.ones(1, 4, dtype=torch.bool),
                         old_logprobs=torch.zeros(1, 4), old_values=old, returns=returns)
    total, stats = ppo_value_loss(values, batch, 0.2, vf_coef=0.1, grad_accum_steps=1, batch_tokens=4, group=None)
    assert total.item() == pytest.approx(0.1 * (0.125 + 0.405 + 0.5 + 0.045) / 4)
    assert stats["value_clip_fraction"].item() == pytest.approx(0.25)


def test_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    batch = RolloutBatch(tokens=None, advantages=adv, loss_mask=torch.ones(1, 3, dtype=torch.bool),
                         old_logprobs=torch.zeros(1, 3))
    loss, stats = ppo_policy_loss(ratios.log(), torch.zeros(1, 3), batch, LossSettings(epsilon=0.2), 1, 3, None)
    # max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8; max(-2.2, -2.2) = -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-6)
    assert stats["clip_ratio_high"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio_low"].item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0, abs=1e-4)
    assert explained_variance(torch.full((1, 4), 2.5), returns, mask) == pytest.approx(0.0, abs=1e-4)


# --- options ----------------------------------------------------------------------------------------


def test_options_and_refusals(tmp_path):
    help_text = build_parser().format_help()
    for option in ("--gamma", "--lam", "--cliprange-value", "--vf-coef", "--ppo-epochs"):
        assert option in help_text
    config = TrainConfig(algorithm="ppo")
    assert (config.gamma, config.lam, config.cliprange_value, config.vf_coef, config.ppo_epochs) == (
        1.0, 0.95, 0.2, 0.1, 1)
    for bad, match in [(dict(num_iterations=2), "--num-iterations must be 1"),
                       (dict(fsdp=True), "does not support --fsdp"),
                       (dict(gamma=1.5), "--gamma must be in"), (dict(lam=-0.1), "--lam must be in"),
                       (dict(cliprange_value=0.0), "--cliprange-value must be"),
                       (dict(ppo_epochs=0), "--ppo-epochs must be >= 1")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig(algorithm="ppo", **bad).validate()


def test_compare_arm_can_set_ppo(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 2\n")
    specs = plan_comparison(base, ["algorithm=ppo,dtype=bfloat16", "algorithm=ppo,dtype=float16"], [0],
                            tmp_path / "cmp")
    from fp16rl.config.parse import parse_train_args

    configs = [parse_train_args(spec.train_args(base)) for spec in specs]
    assert [(c.algorithm, c.dtype, c.arm) for c in configs] == [
        ("ppo", "bfloat16", "algorithm=ppo,dtype=bfloat16"), ("ppo", "float16", "algorithm=ppo,dtype=float16")]


# --- runs -------------------------------------------------------------------------------------------

VALUE_METRICS = ("value/loss", "value/explained_variance", "value/clip_fraction", "value/mean",
                 "value/kl_penalty_mean", "policy/clip_ratio_low", "policy/clip_ratio_high")
MISMATCH_METRICS = ("mismatch/logp_abs_diff_mean", "mismatch/token_kl_k3", "optim/loss_scale", "reward/mean")


@pytest.mark.parametrize("dtype,lora_r", [("float16", 0), ("bfloat16", 8), ("float16", 8), ("bfloat16", 0)])
def test_short_run_logs_value_and_mismatch_metrics_every_step(tmp_path, dtype, lora_r):
    trainer = Trainer(ppo_config(tmp_path / "run", dtype=dtype, lora_r=lora_r, max_steps=2, beta=0.05, ppo_epochs=2,
                                 save_steps=1, num_generations=4, prompts_per_step=2))
    trainer.train(show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        missing = [name for name in VALUE_METRICS + MISMATCH_METRICS if name not in record]
        assert not missing, (record["step"], missing)
        assert all(math.isfinite(record[name]) for name in VALUE_METRICS + MISMATCH_METRICS)
        assert record["mismatch/logp_abs_diff_mean"] > 0  # half precision: the engines differ by rounding
        assert record["value/loss"] > 0
    assert records[0]["value/kl_penalty_mean"] == 0.0  # the policy is the reference at step 1
    assert trainer.precision_report["engines_agree"] is True
    critic = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "critic.safetensors"))
    assert "value_head.weight" in critic and all(t.dtype == torch.float32 for t in critic.values())
    if lora_r:  # the critic's own adapter on the shared frozen base; the policy's weights do not include it
        assert all(".critic." in name or name.startswith("value_head.") for name in critic)
        assert not any(".critic." in name for name in trainer.weights.names)
    else:
        assert len(critic) > 10  # the copy of the decoder stack


@pytest.mark.parametrize("overrides", [dict(dtype="float32", lora_r=0, ppo_epochs=2, beta=0.05),
                                       dict(dtype="bfloat16", lora_r=8, gradient_accumulation_steps=2)])
def test_resume_is_exact(tmp_path, overrides):
    assert_resume_is_exact(tmp_path, ppo_config, num_generations=4, prompts_per_step=2, **overrides)


def _masters(trainer: Trainer) -> dict[str, torch.Tensor]:
    weights = {name: t.detach().clone() for name, t in trainer.weights.named_masters().items()}
    weights.update({f"critic:{name}": t.detach().clone() for name, t in trainer.critic.weights.named_masters().items()})
    return weights


def test_micro_batches_do_not_change_the_step(tmp_path, monkeypatch):
    """GA micro-batches and forwards of fewer rows normalise as the whole batch: the same losses, metrics and
    updated weights, also when the micro-batches hold different numbers of loss tokens. 43 of the 512 tokens
    stop a completion, so the random tiny model's completions end at lengths 24, 5, 20, 24, 3, 24, 16, 12
    (micro-batch token sums 53 / 51 / 27 at GA 2 / 4 differ: bnpo's per-micro-batch mean gave optim/loss
    -6.8e-3 at GA 2 and 2.1e-2 at GA 4 for 4.2e-4 whole). At step 1 (one epoch: ratio 1) the policy loss is
    minus the mean of whitened advantages, 0, so optim/loss is vf_coef x value/loss: what is logged is what
    was backpropagated."""
    monkeypatch.setattr("fp16rl.training.setup.stop_token_ids", lambda model, tokenizer: list(range(3, 512, 12)))
    runs, weights, lengths = {}, {}, {}
    for name, extra in [("whole", {}), ("ga2", dict(gradient_accumulation_steps=2)),
                        ("ga4", dict(gradient_accumulation_steps=4)), ("rows", dict(per_device_train_batch_size=2))]:
        trainer = Trainer(ppo_config(tmp_path / name, max_steps=1, num_generations=4, prompts_per_step=2, **extra))
        runs[name] = trainer.step(1)
        weights[name] = _masters(trainer)
        lengths[name] = runs[name]["completion/length_mean"]
    whole = runs["whole"]
    assert whole["completion/length_mean"] < whole["completion/length_max"]  # unequal token counts
    assert whole["optim/loss"] == pytest.approx(0.1 * whole["value/loss"], rel=1e-4, abs=1e-7)
    for name in ("ga2", "ga4", "rows"):
        assert lengths[name] == lengths["whole"]
        for key in ("optim/loss", "value/loss", "value/explained_variance", "optim/grad_norm",
                    "value/clip_fraction"):
            assert runs[name][key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), (name, key)
        # fp32 rounding through one AdamW step (lr 2e-3): measured 2e-6 at most; a wrong normalisation moves
        # weights by ~lr
        for key, value in weights["whole"].items():
            assert (weights[name][key] - value).abs().max().item() <= 2e-5, (name, key)


def test_initial_weights_do_not_depend_on_whether_the_tiny_model_was_written(tmp_path, monkeypatch):
    """On a fresh FP16RL_HOME the first run writes the tiny model after seeding: that must not draw from the
    run's random stream, or its LoRA A matrices and value head start elsewhere than every later run's (a
    compare's first arm unpaired with the others)."""
    monkeypatch.setenv("FP16RL_HOME", str(tmp_path / "fresh-home"))
    first, second = (_masters(Trainer(ppo_config(tmp_path / name, lora_r=8))) for name in ("first", "second"))
    assert (tmp_path / "fresh-home" / "models").is_dir()
    assert first.keys() == second.keys() and any("lora_A" in name for name in first)
    assert any("value_head" in name for name in first)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_toy_reward_rises_with_ppo(tmp_path, dtype):
    """The GRPO test's task, model, steps and thresholds (tests/test_trainer.py). With lam = 1 (Monte-Carlo
    returns minus the critic's baseline) the one terminal reward reaches every token undiscounted while the
    critic is still cold; on the dev CPU the reward goes ~0.05 -> ~0.75 (first vs last 5 steps) in both
    dtypes, and with TRL's lam 0.95 more slowly (~0.05 -> ~0.6 fp16, ~0.36 bf16)."""
    trainer = Trainer(ppo_config(tmp_path / "run", dtype=dtype, max_steps=25, lam=1.0))
    trainer.train(show_progress=False)
    records = assert_toy_reward_rises(tmp_path / "run")
    assert all("mismatch/token_kl_k3" in r and "value/loss" in r for r in records)
    assert trainer.precision_report["engines_agree"] is True


def test_several_ranks_are_refused(tmp_path, monkeypatch):
    class SeveralRanks:
        enabled = True
        world_size = 2

    monkeypatch.setattr("fp16rl.training.trainer.DataParallel.from_environment", lambda device_type: SeveralRanks())
    with pytest.raises(ConfigError, match="--algorithm ppo trains in one process"):
        Trainer(ppo_config(tmp_path / "run"))


def test_a_checkpoint_without_a_critic_cannot_resume_ppo(tmp_path):
    """GRPO and online DPO checkpoints keep their format (no critic file) and load as before; PPO refuses them."""
    from fp16rl.training.checkpoint_io import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = save_checkpoint(tmp_path, 1, dict(model.named_parameters()), model, optimizer.state_dict(), scheduler,
                           scaler, {})
    assert not (path / "critic.safetensors").exists()
    loaded = {}
    load_checkpoint(path, lambda tensors, source: loaded.update(tensors), optimizer, scheduler, scaler)
    assert set(loaded) == {"weight", "bias"}
    with pytest.raises(ConfigError, match="has no critic.safetensors"):
        load_checkpoint(path, lambda tensors, source: None, optimizer, scheduler, scaler,
                        {"critic": lambda tensors, source: None})
