"""`fp16rl report` on synthetic runs: files, hand-computed numbers, the bootstrap, the conclusion, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fp16rl.core.errors import FolderInUseError, ReportError
from fp16rl.runs.folders import arm_slug
from fp16rl.report import arm_label, build_report, load_inputs, moving_average
from fp16rl.report import analyse as analyse_typed
from fp16rl.runs.tracking import best_reward, final_reward


def analyse(inputs, reference=None):
    """report.json's numbers (the typed Analysis as the JSON the report writes)."""
    return analyse_typed(inputs, reference).to_json()

BF16, FP16 = "dtype=bfloat16", "dtype=float16"
SEEDS = (0, 1, 2)
STEPS = 20


def write_run(run_dir: Path, *, arm: str | None, seed: int, dtype: str, records: list[dict],
              status: str | None = "finished", collapse_step: int | None = None, extra_config: dict | None = None) -> Path:
    """A run folder in the trainer's format; ``status=None`` leaves out summary.json (an unfinished run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"dtype": dtype, "sampler_dtype": None, "trainer_dtype": None, "seed": seed, "is_correction": "none",
              "arm": arm, **(extra_config or {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"config": config, "precision": {"observed": dtype}}))
    if status is not None:
        summary = {"status": status, "steps_completed": records[-1]["step"], "total_steps": STEPS,
                   "final_reward": None, "best_reward": None, "collapse_step": collapse_step,
                   "collapse_rule": "reward_drop" if collapse_step else None,
                   "collapse_detail": "reward fell" if collapse_step else None,
                   "steps_per_s": 2.0, "wall_s": 10.0, "arm": arm, "seed": seed}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def fp16_records(seed: int) -> list[dict]:
    """Reward 0.5 + 0.01 t + 0.05 seed; |dlogp| 0.001 t; loss scale logged (fp16 only); one negative seq KL."""
    return [{"step": t, "reward/mean": 0.5 + 0.01 * t + 0.05 * seed, "mismatch/logp_abs_diff_mean": 0.001 * t,
             "mismatch/seq_kl": -1e-4 if t == 3 else 1e-4 * t, "completion/truncated_ratio": 0.1,
             "policy/entropy": 1.0 - 0.01 * t, "optim/grad_norm": 0.5, "optim/loss_scale": 65536.0 * 2 ** (t // 10),
             "time/step_s": 0.5} for t in range(1, STEPS + 1)]


def bf16_records(seed: int) -> list[dict]:
    """Reward 0.4 + 0.01 t + 0.05 seed and |dlogp| 0.01 t; seed 1 collapses: reward 0 after step 10, stops at 15."""
    steps = 15 if seed == 1 else STEPS
    records = []
    for t in range(1, steps + 1):
        reward = 0.0 if (seed == 1 and t > 10) else 0.4 + 0.01 * t + 0.05 * seed
        records.append({"step": t, "reward/mean": reward, "mismatch/logp_abs_diff_mean": 0.01 * t,
                        "mismatch/seq_kl": 1e-2 * t, "completion/truncated_ratio": 0.1 + (0.5 if reward == 0 else 0),
                        "policy/entropy": "nan" if t == 2 else 1.0, "optim/grad_norm": "inf" if t == 5 else 0.7,
                        "time/step_s": 0.5})
    return records


def write_compare(root: Path, arms: tuple[str, ...] = (BF16, FP16), seeds: tuple[int, ...] = SEEDS) -> Path:
    """Two arms x seeds; bf16 seed 1 collapses (stopped at step 15)."""
    specs = [{"name": arm, "overrides": {"dtype": arm.split("=")[1]}} for arm in arms]
    root.mkdir(parents=True)
    spec = {"base_config": {"max_steps": STEPS}, "arms": specs, "seeds": list(seeds)}
    (root / "compare.json").write_text(json.dumps(spec))
    for arm in arms:
        for seed in seeds:
            run_dir = root / "runs" / arm_slug(arm) / f"seed-{seed}"
            if arm == BF16:
                collapsed = seed == 1
                write_run(run_dir, arm=arm, seed=seed, dtype="bfloat16", records=bf16_records(seed),
                          status="stopped_on_collapse" if collapsed else "finished",
                          collapse_step=13 if collapsed else None)
            else:
                write_run(run_dir, arm=arm, seed=seed, dtype="float16", records=fp16_records(seed))
    return root


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    return write_compare(tmp_path / "cmp")


def test_reward_definitions_match_summary_json():
    rewards = np.array([0.1, 0.2, float("nan"), 0.3] + [0.5] * 16 + [0.9, 0.7])
    assert final_reward(rewards) == pytest.approx(0.8)  # 21 finite values: last 21 // 10 = 2
    assert final_reward(np.array([1.0, 2.0, 4.0])) == 4.0  # at least one step
    assert best_reward(rewards) == pytest.approx(0.8)  # the best 2 consecutive steps are the last 2
    assert best_reward(np.array([1.0, 3.0])) == 3.0  # under 20 steps: the window is 1 step
    assert best_reward(np.arange(30.0)) == pytest.approx(np.mean(np.arange(27.0, 30.0)))  # 3-step windows
    assert best_reward(np.array([5.0] * 10 + [0.0] * 10)) == 5.0  # after a collapse: the best 2 steps
    assert final_reward(np.array([np.nan])) is None and best_reward(np.array([np.nan])) is None


def test_best_reward_is_never_below_final_reward():
    """Issue 23: a short run's best (a 10-step average) fell below its final reward (its last step)."""
    assert best_reward(np.array([0.2, 0.1, 0.3, 0.6])) == final_reward(np.array([0.2, 0.1, 0.3, 0.6])) == 0.6
    generator = np.random.default_rng(0)
    for size in [1, 2, 5, 9, 10, 11, 19, 20, 21, 99, 100, 101, 1000]:
        for _ in range(20):
            rewards = generator.random(size) * generator.choice([1e-3, 1.0, 1e3])
            rewards[generator.random(size) < 0.1] = np.nan
            if np.isfinite(rewards).any():
                assert best_reward(rewards) >= final_reward(rewards)


def test_moving_average_ignores_nan():
    out = moving_average(np.array([1.0, np.nan, 3.0, 5.0]), 2)
    assert out.tolist() == [1.0, 1.0, 3.0, 4.0]


def test_numbers_match_the_fixtures(compare_dir: Path):
    data = analyse(load_inputs([compare_dir]))
    runs = {(r["arm"], r["seed"]): r for r in data["runs"]}
    fp16_0 = runs[FP16, 0]
    assert fp16_0["final_reward"] == pytest.approx((0.69 + 0.70) / 2)  # last 2 of 20 steps
    assert fp16_0["best_reward"] == pytest.approx(0.5 + 0.195)  # rising: the best 2 steps are the last 2
    assert fp16_0["median_logp_abs_diff"] == pytest.approx(0.0105)
    assert fp16_0["steps_per_s"] == 2.0
    collapsed = runs[BF16, 1]
    assert collapsed["status"] == "stopped_on_collapse"
    assert (collapsed["steps_completed"], collapsed["collapse_step"]) == (15, 13)
    assert collapsed["final_reward"] == 0.0  # last 15 // 10 = 1 step
    assert collapsed["best_reward"] == pytest.approx(0.45 + 0.10)  # 1-step windows: step 10 of seed 1
    assert collapsed["median_logp_abs_diff"] == pytest.approx(0.08)

    arms = {a["arm"]: a for a in data["arms"]}
    assert arms[BF16]["collapses"] == 1 and arms[FP16]["collapses"] == 0
    assert arms[FP16]["final_reward_mean"] == pytest.approx(0.695 + 0.05)
    assert arms[FP16]["median_logp_abs_diff"] == pytest.approx(0.0105)
    assert arms[BF16]["median_logp_abs_diff"] == pytest.approx(0.105)  # medians 0.105, 0.08, 0.105

    (comparison,) = data["comparisons"]
    assert (comparison["reference"], comparison["arm"], comparison["paired_seeds"]) == (BF16, FP16, [0, 1, 2])
    per_seed = comparison["final_reward_diff_per_seed"]
    assert per_seed["0"] == pytest.approx(0.1) and per_seed["2"] == pytest.approx(0.1)
    assert per_seed["1"] == pytest.approx(0.745)
    assert comparison["final_reward_diff_mean"] == pytest.approx(0.315)
    low, high = comparison["final_reward_diff_ci"]  # Student t: sd 0.3724, se = sd / sqrt(3) = 0.215
    assert (low, high) == pytest.approx((0.315 - 4.302653 * 0.215, 0.315 + 4.302653 * 0.215), abs=1e-5)
    ratios = comparison["logp_abs_diff_ratio_per_seed"]
    assert ratios["0"] == pytest.approx(0.1) and ratios["1"] == pytest.approx(0.0105 / 0.08)
    assert comparison["logp_abs_diff_diff_per_seed"]["0"] == pytest.approx(0.0105 - 0.105)
    assert comparison["logp_abs_diff_ratio"] == pytest.approx((0.1 * 0.0105 / 0.08 * 0.1) ** (1 / 3))
    assert comparison["collapses"] == {"arm": [0, 3], "reference": [1, 3]}


def test_conclusion_follows_the_data_and_flips_with_the_reference(tmp_path: Path):
    inputs = load_inputs([write_compare(tmp_path / "cmp", seeds=tuple(range(10)))])  # diffs: 0.1 x 9, 0.745
    data = analyse(inputs)
    line = data["conclusion"][0]
    assert data["comparisons"][0]["final_reward_diff_mean"] == pytest.approx(0.1645)
    assert line.startswith(f"{FP16} vs {BF16}: final reward higher by +0.16") and "[+0.019, +0.310]" in line
    assert "10 paired seeds" in line and "collapses 0/10 vs 1/10" in line and "x lower" in line
    swapped = analyse(inputs, reference=FP16)
    line = swapped["conclusion"][0]
    assert line.startswith(f"{BF16} vs {FP16}: final reward lower by -0.16") and "[-0.310, -0.019]" in line
    assert "collapses 1/10 vs 0/10" in line and "x higher" in line
    forward = analyse(inputs)["comparisons"][0]["final_reward_diff_ci"]
    assert swapped["comparisons"][0]["final_reward_diff_ci"] == pytest.approx((-forward[1], -forward[0]))


def test_no_clear_difference_when_the_interval_includes_zero(tmp_path: Path):
    for seed, shift in zip(SEEDS, (0.05, -0.05, 0.02)):
        write_run(tmp_path / f"a{seed}", arm="A", seed=seed, dtype="bfloat16", records=fp16_records(0))
        records = [{**r, "reward/mean": r["reward/mean"] + shift} for r in fp16_records(0)]
        write_run(tmp_path / f"b{seed}", arm="B", seed=seed, dtype="float16", records=records)
    paths = [tmp_path / f"{x}{s}" for x in "ab" for s in SEEDS]
    line = analyse(load_inputs(paths))["conclusion"][0]
    assert line.startswith("B vs A: cannot decide on final reward with 3 paired seeds (a decision needs at least 6): "
                           "+0.007 [")
    assert "median |Δlogp| ratio 1 [1, 1]: no clear difference (interval includes 1)" in line


def test_report_files(compare_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    html_path = build_report([compare_dir], out)
    assert html_path == out / "report.html"
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 6  # reward, mismatch, truncated, entropy, grad norm, loss scale
    assert page.index("Conclusion") < page.index("<table")
    markdown = (out / "report.md").read_text()
    assert "![Reward](reward.png)" in markdown and "x lower" in markdown
    for name in ("reward.png", "mismatch.png", "truncated_ratio.png", "entropy.png", "grad_norm.png", "loss_scale.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["conclusion"] and data["comparisons"][0]["paired_seeds"] == [0, 1, 2]
    assert data["method"]["min_paired_seeds"] == 6


def test_output_folder_is_not_overwritten_by_accident(compare_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    build_report([compare_dir], out)
    with pytest.raises(FolderInUseError, match="not empty.*--overwrite"):
        build_report([compare_dir], out)
    (out / "notes.txt").write_text("mine")
    build_report([compare_dir], out, overwrite=True, smooth=1)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").is_file()


def test_plots_only_metrics_that_exist(tmp_path: Path):
    records = [{"step": t, "reward/mean": 0.1 * t} for t in range(1, 6)]
    run = write_run(tmp_path / "run", arm=None, seed=4, dtype="fp16", records=records)
    out = tmp_path / "out"
    build_report([run], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["reward.png"]
    data = json.loads((out / "report.json").read_text())
    assert data["runs"][0]["arm"] == FP16 and data["runs"][0]["seed"] == 4  # label and seed from config.yaml
    assert data["conclusion"][0].startswith("only one arm")


def test_arc_runs_plot_the_copy_share(tmp_path: Path):
    records = [{"step": t, "reward/mean": 0.1 * t, "arc/copy_fraction": 0.05 * t} for t in range(1, 6)]
    run = write_run(tmp_path / "run", arm=None, seed=0, dtype="fp16", records=records)
    out = tmp_path / "out"
    build_report([run], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["copy_fraction.png", "reward.png"]
    assert "copy_fraction.png" in json.loads((out / "report.json").read_text())["figures"]


def test_single_seed_says_no_interval(tmp_path: Path):
    cmp = write_compare(tmp_path / "cmp", seeds=(0,))
    line = analyse(load_inputs([cmp]))["conclusion"][0]
    assert "+0.100 on 1 paired seed (no interval can be computed from a single seed)" in line
    assert "10x lower" in line  # 0.0105 / 0.105


def test_missing_and_unfinished_runs(compare_dir: Path, tmp_path: Path):
    shutil.rmtree(compare_dir / "runs" / arm_slug(FP16) / "seed-2")
    (compare_dir / "runs" / arm_slug(BF16) / "seed-0" / "summary.json").unlink()
    inputs = load_inputs([compare_dir])
    assert any("seed 2: no run folder" in note for note in inputs.notes)
    data = analyse(inputs)
    unfinished = [r for r in data["runs"] if r["status"] == "unfinished"]
    assert [(r["arm"], r["seed"]) for r in unfinished] == [(BF16, 0)]
    (comparison,) = data["comparisons"]
    assert comparison["paired_seeds"] == [1]  # seed 0 unfinished in bf16, seed 2 missing in fp16
    assert "on 1 paired seed" in data["conclusion"][0]
    assert comparison["collapses"] == {"arm": [0, 2], "reference": [1, 2]}
    build_report([compare_dir], tmp_path / "out")  # plots and tables still work


def test_plain_run_dirs_pair_by_config(tmp_path: Path):
    for seed in (0, 1):
        write_run(tmp_path / f"bf{seed}", arm=None, seed=seed, dtype="bfloat16", records=bf16_records(0))
        write_run(tmp_path / f"fp{seed}", arm=None, seed=seed, dtype="float16", records=fp16_records(0),
                  extra_config={"is_correction": "token_truncate"})
    data = analyse(load_inputs([tmp_path / "bf0", tmp_path / "fp0", tmp_path / "bf1", tmp_path / "fp1"]))
    assert [a["arm"] for a in data["arms"]] == [BF16, "dtype=float16,is_correction=token_truncate"]
    assert data["comparisons"][0]["paired_seeds"] == [0, 1]


def test_arm_label_and_slug():
    assert arm_label({"dtype": "bf16", "sampler_dtype": "fp16", "is_correction": "token_mask"}) == \
        "dtype=bfloat16,sampler_dtype=float16,is_correction=token_mask"
    assert arm_slug("dtype=bfloat16,is_correction=token_truncate") == "dtype=bfloat16_is_correction=token_truncate"
    assert arm_slug("a b/c") == "a_b_c"


def test_legend_labels_keep_what_tells_arms_apart():
    """A legend of long arm names squeezed the plot to a sliver: each label keeps the overrides that differ
    and the shared ones are said once (wrapped); a single arm or identical parts keep the whole name."""
    from fp16rl.report.plots import arm_labels

    common = "importance_sampling_level=sequence,loss_type=grpo,is_clip_min=0.98,is_clip_max=1.02"
    labels, shared = arm_labels([f"dtype=bfloat16,{common}", f"dtype=float16,{common}"])
    assert labels == {f"dtype=bfloat16,{common}": "dtype=bfloat16", f"dtype=float16,{common}": "dtype=float16"}
    assert shared == common
    labels, shared = arm_labels(["dtype=bfloat16,lr=1", "dtype=float16,lr=2", "dtype=float32,lr=1"])
    assert labels["dtype=float16,lr=2"] == "dtype=float16,lr=2" and labels["dtype=bfloat16,lr=1"] == "dtype=bfloat16,lr=1"
    assert shared == ""
    long = ",".join(f"option_{i}=value_{i}" for i in range(8))
    labels, shared = arm_labels([long])
    assert shared == "" and labels[long].replace("\n", "") == long and max(map(len, labels[long].split("\n"))) <= 60


def test_bad_paths(tmp_path: Path):
    with pytest.raises(ReportError, match="does not exist"):
        load_inputs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="neither a run folder"):
        load_inputs([tmp_path / "empty"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="holds no metrics"):
        load_inputs([run])
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    spec = {"base_config": {}, "arms": [{"name": "x", "overrides": {}}], "seeds": [0]}
    (cmp / "compare.json").write_text(json.dumps(spec))
    with pytest.raises(ReportError, match="holds no metrics"):
        load_inputs([cmp])


def test_duplicate_arm_and_seed_is_refused(tmp_path: Path):
    for name in ("a", "b"):
        write_run(tmp_path / name, arm="X", seed=0, dtype="float16", records=fp16_records(0))
    with pytest.raises(ReportError, match="two runs for arm 'X' seed 0"):
        load_inputs([tmp_path / "a", tmp_path / "b"])


def test_cli_report(compare_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from fp16rl.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["report", str(compare_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].endswith(str(out / "report.html"))
    assert f"{FP16} vs {BF16}" in result.stdout
    bad = runner.invoke(app, ["report", str(tmp_path / "missing"), "-o", str(tmp_path / "out2")])
    assert bad.exit_code == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr
    again = runner.invoke(app, ["report", str(compare_dir), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert math.isfinite(json.loads((out / "report.json").read_text())["comparisons"][0]["final_reward_diff_mean"])


def test_log_panel_with_only_non_positive_values(tmp_path: Path):
    """A short run whose gradient norm is 0 at every step (all completions masked) still gets a report."""
    records = [{"step": t, "reward/mean": 0.1, "optim/grad_norm": 0.0, "mismatch/seq_kl": -1e-3}
               for t in range(1, 4)]
    run = write_run(tmp_path / "run", arm=None, seed=0, dtype="float16", records=records)
    html = build_report([run], tmp_path / "out")
    assert html.is_file() and (tmp_path / "out" / "grad_norm.png").is_file()


def test_run_table_counts_skipped_steps(tmp_path: Path):
    """Issue 23: the report had no column for skipped fp16 steps."""
    totals = [0, 0, 1, 1, 3, 3]  # optim/skipped_steps_total after each step
    records = [{**r, "optim/skipped_steps_total": float(total)} for r, total in zip(fp16_records(0), totals)]
    write_run(tmp_path / "fp16", arm="A", seed=0, dtype="float16", records=records)
    old = [{**r, "optim/step_skipped": 1.0 if r["step"] in (2, 7) else 0.0} for r in fp16_records(0)]
    write_run(tmp_path / "old", arm="B", seed=0, dtype="float16", records=old)  # only the per-step flag logged
    write_run(tmp_path / "none", arm="C", seed=0, dtype="float16", records=fp16_records(0))
    data = analyse(load_inputs([tmp_path / "fp16", tmp_path / "old", tmp_path / "none"]))
    assert {r["arm"]: r["skipped_steps"] for r in data["runs"]} == {"A": 3, "B": 2, "C": None}
    build_report([tmp_path / "fp16", tmp_path / "old", tmp_path / "none"], tmp_path / "out")
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "skipped steps" in line)  # the run table's header
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)] for line in lines[start:]]  # not at \|
    rows = rows[:next(i for i, row in enumerate(rows) if len(row) == 1)]  # up to the blank line after it
    column = rows[0].index("skipped steps")
    assert {row[1]: row[column] for row in rows[2:]} == {"A": "3", "B": "2", "C": "-"}
