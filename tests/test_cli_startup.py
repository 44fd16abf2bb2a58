"""The CLI answers fast: help and refused runs never load torch; slow half precision is said up front."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from fp16rl.model import hardware
from fp16rl.training.trainer import Trainer
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
    monkeypatch.setattr(hardware, "emulated_dtypes", lambda: frozenset())  # a kernel exists, but is slow
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


def test_a_dtype_without_a_kernel_is_announced_as_widened(tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(hardware, "emulated_dtypes", lambda: frozenset({torch.bfloat16}))
    monkeypatch.setattr(hardware, "matmul_slowdown", lambda dtype: 1.0)
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        Trainer(toy_config(tmp_path / "run", dtype="bfloat16", max_steps=1))
    notes = [r.getMessage() for r in caplog.records if "no kernel on this CPU" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("bfloat16 matmul") and "widen it to float32" in notes[0]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["notes"] == notes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_matmul_slowdown_is_a_measured_ratio(dtype):
    import math

    import torch

    ratio = hardware.matmul_slowdown(getattr(torch, dtype))
    assert math.isfinite(ratio) and ratio > 0  # timings, so no bound: what it means is tested above
    assert hardware.emulation_notes({torch.float32}, torch.device("cpu")) == []


# Rank 0 of a 2-rank launch, as torchrun's environment describes it, asking for what ranks cannot run.
RANKS_REFUSED = """
import os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_ERROR_FILE=sys.argv[1])
from typer.testing import CliRunner
from fp16rl.cli import app
for argv in (["--algorithm", "ppo"], ["--prompts-per-step", "3"]):
    result = CliRunner().invoke(app, ["train", *argv, "--output-dir", sys.argv[2]])
    assert result.exit_code == 2, result.output
    print(open(sys.argv[1]).read())
heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
assert not heavy, heavy
"""


def test_what_the_ranks_cannot_run_is_refused_before_torch_and_named_for_torchrun(tmp_path):
    """Issue 23: under torchrun `--algorithm ppo` was refused only after torch and the process group
    were up, and torchrun's failure report said "To enable traceback see ...". Now every rank refuses
    before torch loads, and torchelastic's error file carries the one error line, which torchrun's
    report shows as the root cause (its own ChildFailedError traceback is the launcher's: see README)."""
    error_file = tmp_path / "error.json"
    done = subprocess.run([sys.executable, "-c", RANKS_REFUSED, str(error_file), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["message"]["extraInfo"]["py_callstack"] for r in records] == [
        "error: --algorithm ppo trains in one process (its critic's gradients are not reduced across ranks); "
        "launch it without torchrun, or use --algorithm grpo with several ranks",
        "error: --prompts-per-step 3 does not divide among 2 ranks; each rank owns whole prompt groups (use a "
        "multiple of the number of ranks)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_ppo_is_one_error_line_and_torchruns_report_names_it(tmp_path):
    """Rank 0 starts 3 s late, as on a loaded CI machine: rank 1, refusing first, must not exit (torchrun
    would then stop rank 0 before it prints the line: CI saw no error line at all)."""
    late_rank0 = tmp_path / "late_rank0.py"
    late_rank0.write_text("import os, runpy, sys, time\n"
                          "if os.environ['RANK'] == '0':\n    time.sleep(3)\n"
                          "sys.argv[0] = 'fp16rl'\nrunpy.run_module('fp16rl', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(late_rank0), "train", "--model-path", "tiny", "--dataset-path", "toy:digits",
                           "--algorithm", "ppo", "--max-steps", "1", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: --algorithm ppo trains in one process (its critic's gradients are not reduced across ranks); "
        "launch it without torchrun, or use --algorithm grpo with several ranks"]
    assert "traceback : error: --algorithm ppo trains in one process" in output  # torchrun's root cause
    assert output.count("Traceback (most recent call last)") == 1  # the launcher's own; no rank's
    assert not (tmp_path / "run").exists()
