"""Advantages, IS corrections and losses against values computed by hand."""

import math

import pytest
import torch

from fp16rl.algo.grpo import Correction, LossSettings, group_advantages, k3
from fp16rl.algo.grpo import policy_loss as _policy_loss
from fp16rl.algo.batch import RolloutBatch


def test_group_advantages_group_std():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0])
    adv = group_advantages(rewards, num_generations=2, scale_rewards="group")
    # group 1: mean 2, unbiased std sqrt(2); group 2: all equal -> 0
    expected = torch.tensor([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_group_advantages_batch_and_none():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])
    batch_std = torch.tensor([1.0, 3.0, 0.0, 4.0]).std()  # unbiased, over the whole batch
    adv = group_advantages(rewards, 2, "batch")
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (batch_std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 2, "none"), torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "bogus")


def _setup():
    # two sequences of 3 tokens; the second has only 2 real tokens
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, -0.3, 0.0], [0.5, 0.0, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    return new, old, mask, adv


def _per_token_hand(new, adv, eps=0.2):
    # -min(r A, clip(r) A) per token, computed element by element
    out = torch.zeros_like(new)
    for i in range(new.shape[0]):
        for t in range(new.shape[1]):
            r = math.exp(new[i, t].item())
            clipped = min(max(r, 1 - eps), 1 + eps)
            out[i, t] = -min(r * adv[i].item(), clipped * adv[i].item())
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_types_match_hand_computation(loss_type):
    new, old, mask, adv = _setup()
    per_token = _per_token_hand(new, adv) * mask
    expected = {
        "grpo": ((per_token[0, :3].sum() / 3) + (per_token[1, :2].sum() / 2)) / 2,
        "bnpo": per_token.sum() / 5,
        "dapo": per_token.sum() / 10,  # normalised by the tokens of the whole generation batch (10)
        "dr_grpo": per_token.sum() / (2 * 8),  # num sequences * max_completion_length
    }[loss_type]
    settings = LossSettings(loss_type=loss_type, max_completion_length=8)
    loss, stats = policy_loss(new, old, adv, mask, settings, batch_tokens=10)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def policy_loss(new, old, adv, mask, settings, is_weights=None, ref_logprobs=None, grad_accum_steps=1,
                batch_tokens=None):
    """The loss of a RolloutBatch holding these tensors (the formulas are what these tests check)."""
    batch = RolloutBatch(tokens=None, advantages=adv, loss_mask=mask, old_logprobs=old, is_weights=is_weights,
                         ref_logprobs=ref_logprobs)
    return _policy_loss(new, old, batch, settings, grad_accum_steps, batch_tokens)


def test_gradient_accumulation_scales_loss():
    new, old, mask, adv = _setup()
    settings = LossSettings(loss_type="bnpo")
    full, _ = policy_loss(new, old, adv, mask, settings)
    halved, _ = policy_loss(new, old, adv, mask, settings, grad_accum_steps=2)
    assert halved.item() == pytest.approx(full.item() / 2)


def test_clip_ratios_and_asymmetric_clip():
    new, old, mask, adv = _setup()
    # seq 0 (A>0): r = e^0.1 = 1.105 (inside 1.2), e^-0.3 = 0.74 (below 0.8 but A>0: not a low clip)
    # seq 1 (A<0): r = e^0.5 = 1.65 (above, A<0 -> no high clip), 1.0
    _, stats = policy_loss(new, old, adv, mask, LossSettings(epsilon=0.2))
    assert stats["clip_ratio_low"].item() == 0.0 and stats["clip_ratio_high"].item() == 0.0
    new2 = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    _, stats = policy_loss(new2, old, adv, mask, LossSettings(epsilon=0.2, epsilon_high=0.28))
    assert stats["clip_ratio_high"].item() == pytest.approx(1 / 5)  # 1.65 > 1.28 with A>0
    assert stats["clip_ratio_low"].item() == pytest.approx(1 / 5)  # 0.61 < 0.8 with A<0
    # With eps_high 0.28, a ratio of 1.25 and A>0 is not clipped: loss uses r itself
    one = torch.tensor([[math.log(1.25)]])
    loss, _ = policy_loss(one, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool),
                          LossSettings(epsilon=0.2, epsilon_high=0.28))
    assert loss.item() == pytest.approx(-1.25, rel=1e-6)


def test_gspo_sequence_ratio_is_geometric_mean():
    new = torch.tensor([[0.2, -0.1, 0.5]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, _ = policy_loss(new, torch.zeros(1, 3), torch.tensor([1.0]), mask,
                          LossSettings(importance_sampling_level="sequence", loss_type="grpo", epsilon=1.0))
    seq_ratio = math.exp((0.2 - 0.1) / 2)
    assert loss.item() == pytest.approx(-seq_ratio, rel=1e-6)


def test_kl_penalty_k3():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    expected_kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert torch.allclose(k3(ref, lp), torch.tensor([expected_kl]), atol=1e-6)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([0.0]), mask, LossSettings(beta=0.1, loss_type="bnpo"),
                              ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.1 * sum(expected_kl) / 2, rel=1e-5)
    assert stats["kl_ref"].item() == pytest.approx(sum(expected_kl) / 2, rel=1e-5)


def test_is_weight_multiplies_the_surrogate():
    new, old, mask, adv = _setup()
    w = torch.full_like(new, 0.5)
    base, _ = policy_loss(new, old, adv, mask, LossSettings())
    weighted, _ = policy_loss(new, old, adv, mask, LossSettings(), is_weights=w)
    assert weighted.item() == pytest.approx(0.5 * base.item(), rel=1e-6)


def test_is_corrections_by_hand():
    mu = torch.log(torch.tensor([[0.5, 0.1, 0.2], [0.4, 0.4, 0.4]]))
    old = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.2, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # rho = old/mu: [[1, 3, 0.5], [1, 0.5, (2.25, masked)]]
    w, frac = Correction("none").weights(old, mu, mask)
    assert torch.equal(w, torch.ones_like(w)) and frac == 0.0
    w, _ = Correction("token_truncate", clip_max=2.0).weights(old, mu, mask)
    assert torch.allclose(w[mask], torch.tensor([1.0, 2.0, 0.5, 1.0, 0.5]), atol=1e-5)
    w, frac = Correction("token_mask", clip_max=2.0, clip_min=0.6).weights(old, mu, mask)
    assert torch.allclose(w[mask], torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]), atol=1e-5)
    assert frac == pytest.approx(3 / 5)
    seq = torch.tensor([1.0 * 3.0 * 0.5, 1.0 * 0.5])  # full products over real tokens: 1.5, 0.5
    w, _ = Correction("sequence_truncate", clip_max=1.2).weights(old, mu, mask)
    assert torch.allclose(w[:, 0], torch.tensor([1.2, 0.5]), atol=1e-5)
    w, frac = Correction("sequence_mask", clip_max=1.2).weights(old, mu, mask)
    assert torch.allclose(w[:, 0], torch.tensor([0.0, seq[1].item()]), atol=1e-5)
    assert frac == pytest.approx(3 / 5)


def test_token_truncate_honours_the_lower_bound_like_trl():
    """TIS clamps rho into [is_clip_min, is_clip_max] (TRL's vllm_importance_sampling_clip_min/max)."""
    mu = torch.log(torch.tensor([[0.5, 0.1, 0.2], [0.4, 0.4, 0.4]]))
    old = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.2, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    w, _ = Correction("token_truncate", clip_max=2.0, clip_min=0.8).weights(old, mu, mask)
    # rho [1, 3, 0.5, 1, 0.5] -> [1, 2, 0.8, 1, 0.8]; TRL: torch.clamp(ratio, min=clip_min, max=clip_max)
    rho = torch.exp(old - mu)[mask]
    assert torch.allclose(w[mask], torch.clamp(rho, min=0.8, max=2.0), atol=1e-6)
    assert torch.allclose(w[mask], torch.tensor([1.0, 2.0, 0.8, 1.0, 0.8]), atol=1e-5)


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        LossSettings(loss_type="ppo")
    with pytest.raises(ValueError, match="is_correction"):
        Correction("clip")
    with pytest.raises(ValueError, match="clip"):
        Correction("token_mask", clip_max=1.0, clip_min=2.0)


def test_the_algorithm_registry_covers_the_declared_names():
    """``--algorithm`` is checked against config's names before torch loads; each has its step module."""
    from fp16rl.config import options
    from fp16rl.training.algorithm import Algorithm
    from fp16rl.training.algorithms import ALGORITHMS

    assert tuple(ALGORITHMS) == options.ALGORITHMS
    assert all(issubclass(cls, Algorithm) for cls in ALGORITHMS.values())


@pytest.mark.parametrize("name, overrides, passes, recomputes, reference", [
    ("grpo", {}, 1, False, False),  # one pass: pi_old from the training forward
    ("grpo", {"num_iterations": 3, "beta": 0.04}, 3, True, True),
    ("ppo", {"ppo_epochs": 2}, 2, True, False),  # GAE reads pi_old before the loss
    ("online_dpo", {}, 1, True, True),  # the pairs' loss weights come from pi_old; DPO always has a reference
])
def test_each_algorithm_says_what_its_step_needs(tmp_path, name, overrides, passes, recomputes, reference):
    from fp16rl.training.algorithms import make_algorithm
    from support import toy_config

    algorithm = make_algorithm(toy_config(tmp_path, algorithm=name, **overrides))
    assert (algorithm.passes, algorithm.recomputes_pi_old, algorithm.uses_reference) == (passes, recomputes, reference)
    assert algorithm.critic is None  # PPO's is built by ``attach``, once the sampler has copied the policy
