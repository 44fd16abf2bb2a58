"""Online DPO (--algorithm online_dpo): the losses against hand computations and TRL's formula, the pair
selection, split-invariance of loss and gradients, the metrics every step, exact resume, learning."""

from __future__ import annotations

import logging
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import build_parser
from fp16rl.core.errors import ConfigError
from fp16rl.algo.dpo import Collectives, dpo_batch, dpo_losses, select_pairs
from fp16rl.compare import parse_arm, plan_comparison
from fp16rl.learner.logprobs import completion_logprobs
from fp16rl.model.forward import TokenBatch
from fp16rl.core.scores import Scores
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

from support import assert_resume_is_exact, assert_toy_reward_rises, toy_config


def dpo_config(out, **overrides) -> TrainConfig:
    return toy_config(out, **{"algorithm": "online_dpo", **overrides})


# --- formulas ---------------------------------------------------------------------------------------


def test_losses_equal_hand_computations():
    h = torch.tensor([1.0, -2.0, 0.0, 7.5])
    beta = 0.1
    sigmoid = [math.log(1 + math.exp(-beta * x)) for x in h.tolist()]  # -log(1 / (1 + e^{-beta h}))
    ipo = [(x - 1 / (2 * beta)) ** 2 for x in h.tolist()]  # target h = 5
    assert dpo_losses(h, beta, "sigmoid").tolist() == pytest.approx(sigmoid, rel=1e-6)
    assert dpo_losses(h, beta, "ipo").tolist() == pytest.approx([16.0, 49.0, 25.0, 6.25], rel=1e-6)
    assert dpo_losses(h, beta, "ipo").tolist() == pytest.approx(ipo, rel=1e-6)
    assert dpo_losses(torch.zeros(1), 0.5, "sigmoid").item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        dpo_losses(h, beta, "hinge")


def _trl_online_dpo(logprobs, ref_logprobs, completion_mask, chosen, rejected, beta, loss_type):
    """A transcription of TRL's OnlineDPOTrainer.training_step (trl/trainer/online_dpo_trainer.py) from the
    token logprobs on: gather chosen/rejected rows, sum over the completion mask, logits, loss, stats."""
    cr_indices = torch.cat((chosen, rejected), dim=0)
    cr_logprobs, cr_ref_logprobs = logprobs[cr_indices], ref_logprobs[cr_indices]
    cr_padding_mask = ~completion_mask.bool()[cr_indices]
    cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
    batch_size = len(chosen)
    chosen_logprobs_sum, rejected_logprobs_sum = torch.split(cr_logprobs_sum, batch_size)
    chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = torch.split(cr_ref_logprobs_sum, batch_size)
    logits = (chosen_logprobs_sum - rejected_logprobs_sum) - (chosen_ref_logprobs_sum - rejected_ref_logprobs_sum)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (chosen_logprobs_sum - chosen_ref_logprobs_sum)
    rejected_rewards = beta * (rejected_logprobs_sum - rejected_ref_logprobs_sum)
    margin = chosen_rewards - rejected_rewards
    return {"dpo/loss": losses.mean().item(), "dpo/rewards_chosen": chosen_rewards.mean().item(),
            "dpo/rewards_rejected": rejected_rewards.mean().item(), "dpo/rewards_margins": margin.mean().item(),
            "dpo/rewards_accuracies": (margin > 0).float().mean().item(),
            "dpo/logps_chosen": chosen_logprobs_sum.mean().item(),
            "dpo/logps_rejected": rejected_logprobs_sum.mean().item()}, losses.mean()


def _tokens(rows: int, width: int) -> TokenBatch:
    ids = torch.arange(rows * width).view(rows, width) % 7
    return TokenBatch(ids, torch.ones_like(ids), ids, ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_batch_matches_trl_transcription(loss_type):
    """The step's metrics and the gradient of the loss in the sequence logprobs equal TRL's on the same tensors."""
    gen = torch.Generator().manual_seed(0)
    rows, width, beta = 8, 5, 0.1
    logprobs = -torch.rand(rows, width, generator=gen) * 3
    ref = -torch.rand(rows, width, generator=gen) * 3
    mask = torch.rand(rows, width, generator=gen) > 0.3
    rewards = [0.1, 0.7, 0.3, 0.2, 0.0, 0.5, 0.5, 0.9]  # two groups of 4
    pairs = select_pairs(rewards, 4, [True] * rows)
    assert (pairs.chosen, pairs.rejected) == ([1, 7], [0, 4])
    built = dpo_batch(pairs, slice(0, rows), _tokens(rows, width), logprobs, mask,
                      lambda selected: ref[[1, 7, 0, 4]], beta, loss_type, Collectives(lambda v: list(v), lambda n: n))
    chosen, rejected = torch.tensor(pairs.chosen), torch.tensor(pairs.rejected)
    expected, _ = _trl_online_dpo(logprobs, ref, mask, chosen, rejected, beta, loss_type)
    for key, value in expected.items():
        assert built.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert built.metrics["dpo/scores_margin"] == pytest.approx(((0.7 - 0.1) + (0.9 - 0.0)) / 2)
    # The rows' coefficients are TRL's loss differentiated in each row's summed logprob.
    leaf = logprobs.clone().requires_grad_(True)
    _, loss = _trl_online_dpo(leaf, ref, mask, chosen, rejected, beta, loss_type)
    loss.backward()
    seq_grad = (leaf.grad * mask).sum(1) / mask.sum(1).clamp(min=1)  # d loss / d s_row, the same on each token
    assert built.batch.advantages.tolist() == pytest.approx(seq_grad[[1, 7, 0, 4]].tolist(), rel=1e-5)
    assert built.pairs == 2 and built.batch.loss_mask.shape == (4, width)


def test_a_rank_with_fewer_pairs_pads_with_rows_that_weigh_nothing():
    """Rank 1 of 2 (rows 4-7) whose only group tied, while rank 0 has a pair: it still runs the forwards and
    backwards rank 0 runs (DDP and FSDP reduce in them), on rows without loss tokens and with weight 0."""
    rewards = [0.1, 0.9, 0.5, 0.5] + [0.3] * 4
    pairs = select_pairs(rewards, 4, [True] * 8)
    logprobs, mask = -torch.ones(4, 3), torch.ones(4, 3, dtype=torch.bool)
    built = dpo_batch(pairs, slice(4, 8), _tokens(4, 3), logprobs, mask, lambda t: pytest.fail("no rows"),
                      0.1, "sigmoid", Collectives(lambda v: [v[0] + 1.0] + list(v[1:]), lambda n: max(n, 2)))
    assert built.pairs == 1 and built.batch.advantages.tolist() == [0.0, 0.0]
    assert built.batch.loss_mask.shape == (2, 3) and not built.batch.loss_mask.any()
    assert built.batch.tokens.input_ids.shape[0] == 2


def test_pairs_are_highest_and_lowest_reward_ties_and_short_groups_skipped():
    rewards = [0.2, 0.9, 0.9, 0.1,   # chosen 1 (the first of two best), rejected 3
               0.5, 0.5, 0.5, 0.5,   # tied
               0.0, 1.0, 0.3, 0.4,   # only row 11 is a candidate: unpaired
               0.3, 0.3, 0.8, 0.3]   # chosen 14, rejected 12 (the first of the worst)
    candidates = [True] * 8 + [False, False, False, True] + [True] * 4
    pairs = select_pairs(rewards, 4, candidates)
    assert pairs.chosen == [1, 14] and pairs.rejected == [3, 12]
    assert pairs.margins == [0.9 - 0.1, 0.8 - 0.3]  # dpo/scores_margin's terms
    assert (pairs.groups, pairs.tied, pairs.unpaired) == (4, 1, 1)
    # A truncated (non-candidate) row with the best reward is never chosen.
    assert select_pairs([1.0, 0.5, 0.2], 3, [False, True, True]).chosen == [1]


# --- configuration and compare arms -------------------------------------------------------------------


def test_options_and_refusals(tmp_path):
    help_text = build_parser().format_help()
    assert "--algorithm" in help_text and "--dpo-beta" in help_text and "--dpo-loss-type" in help_text
    config = TrainConfig(algorithm="online_dpo")
    config.validate()
    assert (config.dpo_beta, config.dpo_loss_type) == (0.1, "sigmoid")
    for bad, match in [(dict(algorithm="reinforce"), "--algorithm must be one of grpo, ppo, online_dpo"),
                       (dict(algorithm="online_dpo", num_iterations=2), "--num-iterations must be 1"),
                       (dict(algorithm="online_dpo", dpo_beta=0.0), "--dpo-beta must be > 0"),
                       (dict(algorithm="online_dpo", dpo_loss_type="hinge"), "--dpo-loss-type must be one of")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad).validate()
    TrainConfig(algorithm="online_dpo", epsilon=0.3, loss_type="dapo", is_correction="token_mask").validate()


def test_compare_arm_can_set_the_algorithm(tmp_path):
    arm = parse_arm("algorithm=online_dpo,dtype=bfloat16")
    assert arm.overrides == {"algorithm": "online_dpo", "dtype": "bfloat16"}
    base = tmp_path / "base.yaml"
    base.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 2\n")
    specs = plan_comparison(base, ["algorithm=online_dpo,dtype=bfloat16", "algorithm=online_dpo,dtype=float16"],
                            [0], tmp_path / "cmp")
    from fp16rl.config.parse import parse_train_args

    configs = [parse_train_args(spec.train_args(base)) for spec in specs]
    assert [(c.algorithm, c.dtype, c.arm) for c in configs] == [
        ("online_dpo", "bfloat16", "algorithm=online_dpo,dtype=bfloat16"),
        ("online_dpo", "float16", "algorithm=online_dpo,dtype=float16")]


# --- the trainer ------------------------------------------------------------------------------------


def _first_step(tmp_path, name, check_direct=False, **overrides):
    """Loss and gradients of the first optimizer step (before AdamW), fp32; with ``check_direct`` also the
    gradients of the DPO loss computed directly, each pair in one graph (no surrogate)."""
    trainer = Trainer(dpo_config(tmp_path / name, max_steps=1, prompts_per_step=2, num_generations=4,
                                 max_completion_length=12, **overrides))
    captured = {}
    build, step = trainer.algorithm.pairs_batch, trainer._optimizer_step

    def keep(rows):
        captured["dpo"] = build(rows)
        return captured["dpo"]

    def capture():
        captured["grads"] = [p.grad.detach().clone() for p in trainer.weights.params]
        if check_direct:
            captured["direct"] = _direct_gradients(trainer, captured["dpo"])
        return step()

    trainer._optimizer_step = capture
    with mock.patch.object(trainer.algorithm, "pairs_batch", keep):
        metrics = trainer.step(1)
    return metrics, captured


def _direct_gradients(trainer, dpo):
    batch, pairs = dpo.batch, dpo.pairs
    trainer.weights.zero_grad()
    cfg = trainer.config
    logprobs, _ = completion_logprobs(trainer.model, batch.tokens, cfg.temperature, head=trainer.head)
    ref = trainer.reference.logprobs(trainer.logprobs, batch.tokens)
    seq, seq_ref = (logprobs * batch.loss_mask).sum(1), (ref * batch.loss_mask).sum(1)
    h = (seq[:pairs] - seq_ref[:pairs]) - (seq[pairs:] - seq_ref[pairs:])
    dpo_losses(h, cfg.dpo_beta, cfg.dpo_loss_type).mean().backward()
    grads = [p.grad.detach().clone() for p in trainer.weights.params]
    trainer.weights.zero_grad()
    return grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_splits_do_not_change_loss_or_gradients(tmp_path, loss_type):
    """1, 2 or all completions per forward, 1 or 2 gradient-accumulation micro-batches: one loss, one
    gradient, and it is the DPO loss's gradient computed directly with each pair in one graph."""
    reference, captured = _first_step(tmp_path, "all", check_direct=True, dpo_loss_type=loss_type)
    assert reference["dpo/pairs"] > 0 and reference["optim/loss"] == reference["dpo/loss"]
    assert _close(captured["grads"], captured["direct"])
    for name, overrides in [("rows1", dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)),
                            ("rows2", dict(per_device_train_batch_size=2)),
                            ("ga4", dict(gradient_accumulation_steps=4))]:
        metrics, other = _first_step(tmp_path, name, dpo_loss_type=loss_type, **overrides)
        assert metrics["dpo/loss"] == reference["dpo/loss"]  # computed once from pi_old, before any split
        assert metrics["dpo/pairs"] == reference["dpo/pairs"]
        assert _close(other["grads"], captured["grads"]), name


def _close(grads, expected) -> bool:
    """Equal up to fp32 summation order: every difference within 1e-5 of its tensor's largest entry (the
    different splits measure ~1e-6 on the dev CPU; IPO's gradients reach ~60, sigmoid's ~0.3)."""
    return all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(grads, expected))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_short_run_logs_dpo_and_mismatch_metrics_every_step(tmp_path, dtype):
    trainer = Trainer(dpo_config(tmp_path / "run", dtype=dtype, max_steps=2, lora_r=4, lora_alpha=8))
    trainer.train(show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    names = ["dpo/loss", "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/rewards_margins",
             "dpo/rewards_accuracies", "dpo/logps_chosen", "dpo/logps_rejected", "dpo/scores_margin", "dpo/pairs",
             "dpo/tied_fraction", "dpo/unpaired_fraction", "mismatch/token_kl_k3", "mismatch/logp_abs_diff_mean",
             "mismatch/is_ratio_seq_mean", "reward/mean", "reward/digits/mean", "optim/loss", "optim/loss_scale",
             "optim/step_skipped"]
    for record in records:
        missing = [n for n in names if n not in record or not math.isfinite(record[n])]
        assert not missing, (record["step"], missing)
        assert record["mismatch/logp_abs_diff_mean"] > 0  # half precision: the engines differ by rounding
    assert "policy/kl_ref" not in records[-1]  # GRPO's KL penalty is not part of online DPO
    assert trainer.precision_report["engines_agree"] is True


def test_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, dpo_config)


def test_a_step_without_pairs_trains_nothing_and_is_counted(tmp_path, caplog):
    trainer = Trainer(dpo_config(tmp_path / "run", max_steps=1))
    trainer.task.score = lambda items, completions, truncated, ids, progress=None: Scores(rewards=[0.5] * len(completions))
    before = [m.detach().clone() for m in trainer.weights.masters]
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        metrics = trainer.step(1)
    assert metrics["dpo/pairs"] == 0 and metrics["dpo/tied_fraction"] == 1.0
    assert metrics["optim/empty_loss_steps_total"] == 1.0 and metrics["optim/loss_tokens"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.weights.masters))
    assert any("no prompt gave a pair" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_toy_reward_rises_with_online_dpo(tmp_path, dtype):
    """The GRPO test's task, model, steps and thresholds (tests/test_trainer.py); on the dev CPU the reward
    goes ~0.05 -> ~0.7 (first vs last 5 steps) in both dtypes."""
    trainer = Trainer(dpo_config(tmp_path / "run", dtype=dtype, max_steps=25))
    trainer.train(show_progress=False)
    records = assert_toy_reward_rises(tmp_path / "run")
    assert all("mismatch/token_kl_k3" in r and "dpo/loss" in r for r in records)
    assert trainer.precision_report["engines_agree"] is True
