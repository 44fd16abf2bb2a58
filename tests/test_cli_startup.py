"""The CLI answers fast: help and refused runs never load torch; slow half precision is said up front."""

import logging
import subprocess
import sys

import pytest
import yaml

from fp16rl import hardware
from fp16rl.trainer import Trainer
from support import toy_config

LIGHT = """
import sys
from typer.testing import CliRunner
from fp16rl.cli import app
runner = CliRunner()
help_ = runner.invoke(app, ["train", "--help"])
assert help_.exit_code == 0 and "--lora-r" in help_.output and "--lora_r" in help_.output, help_.output
for argv in (["train", "--dtype", "float8"], ["train", "--model-path", "/nonexistent"],
             ["train", "--reward-name", "arc-v1"], ["train", "--output-dir", sys.argv[1]], ["--help"],
             ["arc", "--help"], ["models", "list"]):
    result = runner.invoke(app, argv)
    assert result.exit_code in (0, 2), (argv, result.output)
heavy = sorted(name for name in ("torch", "transformers", "peft", "bitsandbytes") if name in sys.modules)
assert not heavy, heavy
"""


def test_help_and_refusals_do_not_import_the_heavy_libraries(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    result = subprocess.run([sys.executable, "-c", LIGHT, str(used)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_emulated_half_precision_is_announced_with_its_measured_slowdown(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hardware, "matmul_slowdown", lambda dtype: {"torch.float16": 6.25}.get(str(dtype), 1.1))
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        Trainer(toy_config(tmp_path / "run", dtype="float16", max_steps=1))
    notes = [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]
    assert len(notes) == 1 and "float16 matmul on this CPU" in notes[0] and "6.2x slower" in notes[0]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["notes"] == notes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        Trainer(toy_config(tmp_path / "run32", dtype="float32", max_steps=1))
    assert not caplog.records


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_matmul_slowdown_is_a_measured_ratio(dtype):
    import math

    import torch

    ratio = hardware.matmul_slowdown(getattr(torch, dtype))
    assert math.isfinite(ratio) and ratio > 0  # timings, so no bound: what it means is tested above
    assert hardware.emulation_notes({torch.float32}, torch.device("cpu")) == []
