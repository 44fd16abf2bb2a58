"""The report's small-sample statistics (issue 25): exact numbers, error rates by simulation, and
conclusions on runs where the answer is known (equal arms, shifted arms, 2 seeds, per prompt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fp16rl.core.errors import ReportError
from fp16rl.report import analyse, load_inputs, sign_flip_p, t_interval, tost
from fp16rl.report.inference import (betainc, min_seeds_for_decision, seeds_needed, sign_test_p, t_cdf, t_quantile,
                                     t_test_power)
from fp16rl.report.prompts import read_prompt_rewards

STEPS = 10


def write_run(run_dir: Path, arm: str, seed: int, final: float, samples: dict[int, list[dict]] | None = None) -> Path:
    """A finished run whose reward rises linearly to ``final`` at the last step (its final reward), with
    optional samples/ files ({step: records})."""
    run_dir.mkdir(parents=True)
    records = [{"step": t, "reward/mean": final * t / STEPS, "mismatch/logp_abs_diff_mean": 0.01} for t in
               range(1, STEPS + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"config": {"dtype": "float16", "seed": seed, "arm": arm}}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "total_steps": STEPS, "arm": arm,
                                                      "seed": seed, "collapse_step": None}))
    for step, rows in (samples or {}).items():
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "samples" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def write_pairs(root: Path, reference: list[float], arm: list[float]) -> list[Path]:
    paths = []
    for seed, (a, b) in enumerate(zip(reference, arm)):
        paths += [write_run(root / f"ref-{seed}", "ref", seed, a), write_run(root / f"arm-{seed}", "arm", seed, b)]
    return paths


def noisy_pairs(seeds: int, shift: float, noise: float) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(7)
    reference = 0.5 + 0.1 * rng.standard_normal(seeds)
    return reference.tolist(), (reference + shift + noise * rng.standard_normal(seeds)).tolist()


# --- the t distribution, against printed tables and closed forms ---------------------------------------------------

@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (7, 2.3646),
                                          (9, 2.2622), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_the_table(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-quantile, abs=1e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_cdf_matches_closed_forms():
    for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 100.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert t_cdf(1.959964, 10 ** 6) == pytest.approx(0.975, abs=1e-5)  # -> normal
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    assert betainc(2.5, 1.5, 0.3) == pytest.approx(1 - betainc(1.5, 2.5, 0.7), abs=1e-14)


# --- intervals and tests: exact values and error rates -------------------------------------------------------------

def test_t_interval_by_hand_and_none_for_one_value():
    low, high = t_interval([0.1, 0.745, 0.1])  # mean 0.315, sd 0.37239, se 0.215
    assert (low, high) == pytest.approx((0.315 - 4.302653 * 0.215, 0.315 + 4.302653 * 0.215), abs=1e-5)
    assert t_interval([0.4]) is None and t_interval([]) is None
    assert t_interval([0.2, 0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_t_interval_covers_95_percent_at_small_n(n):
    """2000 paired samples from N(0.3, 1): the 95% interval holds the true mean 93-97% of the time
    (the percentile bootstrap this replaces holds it ~50% of the time at n = 2)."""
    rng = np.random.default_rng(n)
    hits = sum(low <= 0.3 <= high for low, high in (t_interval(rng.normal(0.3, 1.0, n).tolist())
                                                     for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.97


def test_sign_flip_exact_values():
    assert sign_flip_p([0.3] * 6) == (2 / 64, True)  # all one sign: the smallest p at 6 seeds
    assert sign_flip_p([0.3] * 5)[0] == 2 / 32  # ... and at 5 seeds, above 0.05
    assert sign_flip_p([1.0, -1.0, 2.0, -2.0]) == (1.0, True)
    assert sign_flip_p([1.0, 2.0, 3.0, -0.5])[0] == pytest.approx(4 / 16)  # |mean| >= 1.375: ±(1,2,3,±0.5)
    p, exact = sign_flip_p([0.3] * 20)  # Monte Carlo beyond 16 seeds: (1 + 0 hits) / (1 + 20000)
    assert not exact and p == pytest.approx(1 / 20_001)
    assert sign_flip_p(list(np.linspace(-1, 2, 20))) == sign_flip_p(list(np.linspace(-1, 2, 20)))  # seeded
    assert min_seeds_for_decision(0.05) == 6 and min_seeds_for_decision(0.01) == 8


@pytest.mark.parametrize("n", [6, 8, 10])
def test_sign_flip_false_positive_rate(n):
    """Equal arms (differences symmetric about 0, heavy-tailed too): rejected at most ~5% of the time."""
    rng = np.random.default_rng(100 + n)
    for draw in (lambda: rng.normal(0, 1, n), lambda: rng.standard_t(2, n)):
        rejections = sum(sign_flip_p(draw().tolist())[0] < 0.05 for _ in range(2000))
        assert rejections / 2000 <= 0.05 + 0.015


def test_tost_by_hand_and_its_error_rate():
    diffs = [0.01, -0.02, 0.0, 0.015]  # mean 0.00125, sd 0.015478, se 0.0077392
    eq = tost(diffs, 0.1)
    assert eq.equivalent and eq.ci == pytest.approx((0.00125 - 2.353363 * 0.0077392, 0.00125 + 2.353363 * 0.0077392),
                                                    abs=1e-6)
    assert eq.p == pytest.approx(1 - t_cdf((0.1 - 0.00125) / 0.0077392, 3), rel=1e-4)
    assert not tost(diffs, 0.01).equivalent and tost([0.5], 0.1) is None
    assert tost([0.02, 0.02], 0.05).equivalent and not tost([0.07, 0.07], 0.05).equivalent
    with pytest.raises(ValueError, match="margin must be > 0"):
        tost(diffs, 0.0)
    rng = np.random.default_rng(3)  # true difference exactly at the margin: "equivalent" at most ~5% of the time
    wrong = sum(tost(rng.normal(0.1, 0.1, 8).tolist(), 0.1).equivalent for _ in range(2000))
    assert wrong / 2000 <= 0.05 + 0.015


def test_power_matches_g_power_and_simulation():
    """One-sample two-sided t-test, alpha 0.05, 80% power: d = 0.5 -> 34, 0.8 -> 15, 1.0 -> 10 (G*Power)."""
    assert [seeds_needed(d, 1.0) for d in (0.5, 0.8, 1.0, 0.2)] == [34, 15, 10, 199]
    assert t_test_power(34, 0.5, 1.0) == pytest.approx(0.8078, abs=1e-4)
    assert seeds_needed(5.0, 1.0) == 6  # never below what the sign-flip test needs
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1e-4, 1.0) is None  # > 100,000
    rng = np.random.default_rng(11)
    rejected = sum(not (ci[0] <= 0 <= ci[1]) for ci in (t_interval(rng.normal(1.0, 1.0, 10).tolist())
                                                        for _ in range(2000)))
    assert abs(rejected / 2000 - t_test_power(10, 1.0, 1.0)) < 0.03


def test_sign_test_exact():
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 10) == pytest.approx(2 * (1 + 13 + 78 + 286) / 2 ** 13)
    assert sign_test_p(4, 4) == 1.0 and sign_test_p(0, 0) == 1.0


# --- conclusions on runs where the answer is known ----------------------------------------------------------------

def comparison_of(paths, margin=None):
    data = analyse(load_inputs(paths), "ref", margin)
    return data, data.comparisons[0]


def test_equal_arms_are_equivalent_within_the_margin(tmp_path):
    data, c = comparison_of(write_pairs(tmp_path, *noisy_pairs(8, 0.0, 0.005)))
    assert c.decision == "equivalent" and c.equivalence.equivalent
    margin = data.method["equivalence_margin"]  # 10% of the reward range logged (0.05 .. ~0.6)
    assert c.equivalence.margin == margin and 0.04 < margin < 0.07
    assert data.conclusion[0].startswith("arm vs ref: final reward equivalent: ")
    assert f"within ±{margin:.3g} (90% CI [" in data.conclusion[0]
    assert "seeds needed" in data.conclusion[2]


def test_shifted_arms_are_different(tmp_path):
    data, c = comparison_of(write_pairs(tmp_path, *noisy_pairs(8, 0.2, 0.02)))
    assert c.decision == "higher" and c.final_reward_sign_flip_p == 2 / 256
    assert c.final_reward_diff_ci[0] > 0.15 and c.final_reward_diff_mean == pytest.approx(0.2, abs=0.03)
    assert data.conclusion[0].startswith("arm vs ref: final reward higher by +0.")
    assert "not shown within" in data.conclusion[0]
    swapped = analyse(load_inputs(write_pairs(tmp_path / "swap", *noisy_pairs(8, 0.2, 0.02)[::-1])), "ref")
    assert swapped.comparisons[0].decision == "lower"


def test_two_seeds_make_no_claim(tmp_path):
    """The demo's case: 2 paired seeds with a large difference (the old bootstrap said "higher by")."""
    data, c = comparison_of(write_pairs(tmp_path, [0.5, 1.0], [2.4, 2.85]))
    assert c.decision == "too few seeds" and c.final_reward_diff_mean == pytest.approx(1.875)
    line = data.conclusion[0]
    assert line.startswith("arm vs ref: cannot decide on final reward with 2 paired seeds (a decision needs at least "
                           "6): +1.875 [")
    assert "higher" not in line and "lower" not in line.split(";")[0]
    assert c.final_reward_diff_ci[0] > 0  # the t interval is valid, yet 2 seeds cannot carry a decision
    wide = analyse(load_inputs(write_pairs(tmp_path / "wide", [0.5, 1.0], [0.5, 1.01])), "ref", 5.0)
    assert wide.comparisons[0].decision == "too few seeds" and wide.comparisons[0].equivalence.equivalent
    assert "cannot decide" in wide.conclusion[0] and "within" not in wide.conclusion[0]
    assert data.conclusion[2].startswith("arm vs ref, seeds needed: ")


def test_five_seeds_of_one_sign_still_make_no_claim(tmp_path):
    data, c = comparison_of(write_pairs(tmp_path, *noisy_pairs(5, 0.3, 0.01)))
    assert c.final_reward_diff_ci[0] > 0 and c.decision == "too few seeds"  # sign-flip p >= 1/16
    _, six = comparison_of(write_pairs(tmp_path / "six", *noisy_pairs(6, 0.3, 0.01)))
    assert six.decision == "higher"


def test_inconclusive_between_difference_and_equivalence(tmp_path):
    data, c = comparison_of(write_pairs(tmp_path, *noisy_pairs(8, 0.05, 0.3)), margin=0.05)
    assert c.decision == "inconclusive" and c.seeds_needed["margin"] > 8
    assert data.conclusion[0].startswith("arm vs ref: inconclusive on final reward")


def prompt_rows(uid: str, rewards: list[float | None]) -> list[dict]:
    return [{"uid": uid, "prompt": "p", "completion": "c", "reward": r} for r in rewards]


def test_per_prompt_comparison(tmp_path):
    """(1, p1): +0.5 at seed 0, +1 at seed 1 -> +0.75; (5, p5): tied; (10, q0): -1; (10, q1): +0.5;
    a step only the arm saved and a non-finite reward are left out."""
    ref = {0: {1: prompt_rows("p1", [0, 1]), 5: prompt_rows("p5", [1, 1]), 10: prompt_rows("q0", [1, 1])},
           1: {1: prompt_rows("p1", [0, 0]), 5: prompt_rows("p5", [0, 1]), 10: prompt_rows("q1", [0.5, 0.5])}}
    arm = {0: {1: prompt_rows("p1", [1, 1]), 5: prompt_rows("p5", [1, 1]), 10: prompt_rows("q0", [0, 0]),
               15: prompt_rows("z", [1, 1])},
           1: {1: prompt_rows("p1", [1, None]), 5: prompt_rows("p5", [1, 0]), 10: prompt_rows("q1", [1, 1])}}
    paths = []
    for seed in (0, 1):
        paths += [write_run(tmp_path / f"ref-{seed}", "ref", seed, 0.5, ref[seed]),
                  write_run(tmp_path / f"arm-{seed}", "arm", seed, 0.5, arm[seed])]
    data, c = comparison_of(paths)
    pp = c.per_prompt
    assert (pp.prompts, pp.steps, pp.seeds, pp.better, pp.worse, pp.tied) == (4, 3, [0, 1], 2, 1, 1)
    assert pp.diff_mean == pytest.approx((0.75 + 0 - 1 + 0.5) / 4) and pp.sign_test_p == 1.0
    assert data.conclusion[1] == ("arm vs ref, per prompt: 4 prompts at 3 steps, 2 seeds: better on 2 (50%), worse "
                                  "on 1 (25%), tied on 1 (25%); mean Δ reward +0.062; sign test p=1.000 (prompts "
                                  "taken as independent; the seed-level test decides)")
    (tmp_path / "ref-0" / "samples" / "step-000005.jsonl").write_text('{"uid": "p5", "reward": 1}\nnot json\n')
    with pytest.raises(ReportError, match=r"step-000005.jsonl, line 2: not valid JSON"):
        analyse(load_inputs(paths))
    (tmp_path / "ref-0" / "samples" / "step-000005.jsonl").write_text('{"reward": 1}\n')
    with pytest.raises(ReportError, match=r"step-000005.jsonl, line 1: a sample record needs a 'uid'"):
        read_prompt_rewards(tmp_path / "ref-0")


def test_without_samples_the_per_prompt_line_says_so(tmp_path):
    data, c = comparison_of(write_pairs(tmp_path, [0.1, 0.2], [0.3, 0.1]))
    assert c.per_prompt is None and "no prompt was recorded in samples/" in data.conclusion[1]


def test_report_and_cli_print_equivalence_and_per_prompt(tmp_path):
    from typer.testing import CliRunner

    from fp16rl.cli import app

    paths = write_pairs(tmp_path / "runs", *noisy_pairs(8, 0.0, 0.005))
    result = CliRunner().invoke(app, ["report", *map(str, paths), "-o", str(tmp_path / "out"), "--margin", "0.02"])
    assert result.exit_code == 0, result.output
    assert "final reward equivalent" in result.stdout and "within ±0.02 (90% CI" in result.stdout
    assert "per prompt:" in result.stdout and "seeds needed:" in result.stdout
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["method"]["equivalence_margin"] == 0.02 and saved["comparisons"][0]["decision"] == "equivalent"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Per-prompt paired comparison (samples/)" in markdown and "equivalent" in markdown
    bad = CliRunner().invoke(app, ["report", *map(str, paths), "-o", str(tmp_path / "out2"), "--margin", "-1"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        "error: --margin must be a positive number of reward units, got -1.0"]
    assert not (tmp_path / "out2").exists()
    assert analyse(load_inputs(paths), "ref", 0.001).comparisons[0].decision == "inconclusive"  # margin not met


def test_per_prompt_means_do_not_depend_on_string_hashing():
    """The per-prompt means were summed in a set's order, which Python's string hashing changes
    from process to process: two `fp16rl report` runs of the same folders differed in the last digit."""
    program = ("import random; from fp16rl.report.prompts import compare_prompts; rng = random.Random(0)\n"
               "ref = {0: {(s, f'uid-{u}'): rng.random() / 3 for s in range(4) for u in range(40)}}\n"
               "arm = {0: {key: rng.random() / 7 for key in ref[0]}}\n"
               "print(repr(compare_prompts(ref, arm)))")
    outputs = {subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
               for seed in (1, 2, 3)}
    assert len(outputs) == 1, outputs
