"""Mismatch metrics: names exactly as in docs/design.md, formulas checked by hand."""

import math

import pytest
import torch

from fp16rl.algo.mismatch import effective_sample_size, mismatch_metrics, pearson, sampling_metrics

DOC_NAMES = {
    "mismatch/token_kl_k1", "mismatch/token_kl_k3", "mismatch/seq_kl", "mismatch/logp_abs_diff_mean",
    "mismatch/logp_abs_diff_max", "mismatch/prob_abs_diff_mean", "mismatch/prob_abs_diff_max",
    "mismatch/prob_diff_min", "mismatch/prob_diff_max", "mismatch/is_ratio_token_min",
    "mismatch/is_ratio_token_mean", "mismatch/is_ratio_token_max", "mismatch/is_ratio_seq_min",
    "mismatch/is_ratio_seq_mean", "mismatch/is_ratio_seq_max", "mismatch/chi2_token", "mismatch/ess",
    "mismatch/pearson_prob",
}


def test_identical_logprobs_give_zero_mismatch():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    m = mismatch_metrics(lp, lp.clone(), torch.ones(2, 2, dtype=torch.bool))
    assert set(m) == DOC_NAMES
    assert m["mismatch/token_kl_k1"] == 0 and m["mismatch/token_kl_k3"] == 0 and m["mismatch/seq_kl"] == 0
    assert m["mismatch/logp_abs_diff_max"] == 0 and m["mismatch/prob_abs_diff_max"] == 0
    assert m["mismatch/is_ratio_seq_mean"] == 1 and m["mismatch/ess"] == pytest.approx(1.0)
    assert m["mismatch/pearson_prob"] == pytest.approx(1.0)


def test_formulas_by_hand():
    lmu = torch.log(torch.tensor([[0.5, 0.2, 0.7], [0.4, 0.1, 0.3]]))
    lpi = torch.log(torch.tensor([[0.4, 0.25, 0.7], [0.5, 0.1, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # last token of row 2 is padding
    m = mismatch_metrics(lmu, lpi, mask)
    mu = [0.5, 0.2, 0.7, 0.4, 0.1]
    pi = [0.4, 0.25, 0.7, 0.5, 0.1]
    d = [math.log(p / q) for p, q in zip(pi, mu)]
    r = [p / q for p, q in zip(pi, mu)]
    assert m["mismatch/token_kl_k1"] == pytest.approx(-sum(d) / 5, abs=1e-6)
    assert m["mismatch/token_kl_k3"] == pytest.approx(sum(ri - 1 - di for ri, di in zip(r, d)) / 5, abs=1e-6)
    seq = [sum(d[:3]), sum(d[3:])]
    assert m["mismatch/seq_kl"] == pytest.approx(-(seq[0] + seq[1]) / 2, abs=1e-6)
    assert m["mismatch/is_ratio_seq_max"] == pytest.approx(max(math.exp(s) for s in seq), rel=1e-5)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(max(abs(x) for x in d), rel=1e-5)
    diffs = [p - q for p, q in zip(pi, mu)]
    assert m["mismatch/prob_diff_min"] == pytest.approx(min(diffs), abs=1e-6)
    assert m["mismatch/prob_diff_max"] == pytest.approx(max(diffs), abs=1e-6)
    assert m["mismatch/prob_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in diffs) / 5, abs=1e-6)
    assert m["mismatch/is_ratio_token_min"] == pytest.approx(min(r), rel=1e-5)
    assert m["mismatch/chi2_token"] == pytest.approx(sum(x * x for x in r) / 5 - 1, rel=1e-5)
    mean_r = sum(r) / 5
    assert m["mismatch/ess"] == pytest.approx(1 / (sum((x / mean_r) ** 2 for x in r) / 5), rel=1e-5)


def test_ess_and_pearson_helpers():
    assert effective_sample_size(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_empty_mask_gives_no_metrics():
    lp = torch.zeros(2, 2)
    assert mismatch_metrics(lp, lp, torch.zeros(2, 2, dtype=torch.bool)) == {}


def test_huge_sequence_ratio_stays_finite():
    lmu = torch.full((1, 200), -5.0)
    lpi = torch.zeros(1, 200)
    m = mismatch_metrics(lmu, lpi, torch.ones(1, 200, dtype=torch.bool))
    assert all(math.isfinite(v) for v in m.values())


def test_sampling_metrics_by_hand():
    """Two real tokens (a third masked): kept masses 0.8 and 0.9; lpi - lmu_b = log 0.8 and log 1.8."""
    mask = torch.tensor([[True, True, False]])
    kept = torch.tensor([[0.8, 0.9, 1.0]])
    behaviour = torch.tensor([[-1.0, -2.0, 0.0]])
    trainer = torch.tensor([[-1.0 + math.log(0.8), -2.0 + math.log(1.8), 5.0]])
    m = sampling_metrics(behaviour, kept, trainer, mask)
    assert m["sampling/kept_mass_mean"] == pytest.approx(0.85) and m["sampling/kept_mass_min"] == pytest.approx(0.8)
    assert m["sampling/behaviour_is_ratio_token_min"] == pytest.approx(0.8, rel=1e-6)
    assert m["sampling/behaviour_is_ratio_token_max"] == pytest.approx(1.8, rel=1e-6)
    assert m["sampling/behaviour_is_ratio_token_mean"] == pytest.approx(1.3, rel=1e-6)
    assert sampling_metrics(behaviour, kept, trainer, torch.zeros_like(mask)) == {}
