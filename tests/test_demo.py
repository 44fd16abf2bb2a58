"""`fp16rl demo --quick`: every stage of the demo end to end, in about two minutes."""

import json

import pytest

from fp16rl.cli.demo import MAX_STEPS, MIN_STEPS, REPORT_S, RUN_OVERHEAD_S, DemoPlan, fresh_dir, run_demo


def test_fresh_dir_never_reuses_a_folder_in_use(tmp_path):
    base = tmp_path / "demo"
    assert fresh_dir(base) == base
    base.mkdir()
    assert fresh_dir(base) == base  # empty: usable
    (base / "x").write_text("1")
    assert fresh_dir(base) == tmp_path / "demo-2"


def test_plans_are_sized_to_the_measured_speed():
    quick = DemoPlan.quick()
    assert len(quick.seeds) == 1 and not quick.probe and quick.steps == 4
    # A CPU with native half precision: the full demo fits easily.
    fast = DemoPlan.sized(540, {"bfloat16": 0.8, "float16": 0.9}, probe_token_s=0.02)
    assert fast.steps == MAX_STEPS and len(fast.seeds) == 2 and (fast.probe_samples, fast.probe_tokens) == (16, 96)
    assert fast.expected_s <= 540
    # fp16 emulated 10x slower: fewer steps and a smaller probe, still inside the budget.
    slow = DemoPlan.sized(540, {"bfloat16": 2.0, "float16": 8.0}, probe_token_s=0.4)
    assert MIN_STEPS <= slow.steps < fast.steps and slow.probe_samples * slow.probe_tokens < 16 * 96
    assert slow.expected_s <= 540
    # time = runs x overhead + seeds x steps x sum(step_s) + probe + report, as the docstring says
    assert slow.expected_s == pytest.approx(4 * RUN_OVERHEAD_S + 2 * slow.steps * 10.0 + 20.0
                                            + slow.probe_samples * slow.probe_tokens * 0.4 + REPORT_S)
    # No probe model: no probe, more steps.
    assert not DemoPlan.sized(540, {"bfloat16": 2.0, "float16": 8.0}, probe_token_s=None).probe


@pytest.mark.slow
@pytest.mark.xdist_group("arc_lite_warm_model")  # the worker of tests/test_arc_train.py: one warm start
def test_quick_demo_writes_a_report(tmp_path):
    lines = []
    html = run_demo(tmp_path / "demo", quick=True, say=lines.append)
    assert html.name == "report.html" and html.is_file()
    assert "data:image/png;base64" in html.read_text()
    compare = tmp_path / "demo" / "compare"
    for arm in ("dtype=bfloat16", "dtype=float16"):
        summary = json.loads((compare / "runs" / arm / "seed-0" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps_completed"] == DemoPlan.quick().steps
    assert any("probe skipped" in line for line in lines)
