"""`fp16rl demo --quick`: every stage of the demo end to end, in about two minutes."""

import json

import pytest

from fp16rl.demo import DemoPlan, fresh_dir, run_demo


def test_fresh_dir_never_reuses_a_folder_in_use(tmp_path):
    base = tmp_path / "demo"
    assert fresh_dir(base) == base
    base.mkdir()
    assert fresh_dir(base) == base  # empty: usable
    (base / "x").write_text("1")
    assert fresh_dir(base) == tmp_path / "demo-2"


def test_plans():
    quick, full = DemoPlan.of(True), DemoPlan.of(False)
    assert len(quick.seeds) == 1 and not quick.probe
    assert len(full.seeds) == 2 and full.probe and full.steps > quick.steps


@pytest.mark.slow
def test_quick_demo_writes_a_report(tmp_path):
    lines = []
    html = run_demo(tmp_path / "demo", quick=True, say=lines.append)
    assert html.name == "report.html" and html.is_file()
    assert "data:image/png;base64" in html.read_text()
    compare = tmp_path / "demo" / "compare"
    for arm in ("dtype=bfloat16", "dtype=float16"):
        summary = json.loads((compare / "runs" / arm / "seed-0" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps_completed"] == DemoPlan.of(True).steps
    assert any("probe skipped" in line for line in lines)
