"""A run survives being killed: checkpoints are atomic and fsync'ed, Ctrl-C saves and stops at a safe
point, and --resume continues exactly in both cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from fp16rl import atomic
from fp16rl.checkpoint import checkpoint_dirs, checkpoint_problem
from fp16rl.tracking import read_metrics
from fp16rl.trainer import Trainer
from support import toy_config

TRAIN_ARGS = ["--model-path", "tiny", "--dataset-path", "toy:digits", "--dtype", "float32", "--lora-r", "0",
              "--learning-rate", "2e-3", "--num-generations", "8", "--prompts-per-step", "4",
              "--max-completion-length", "24", "--max-seq-length", "256", "--beta", "0", "--max-grad-norm", "1.0",
              "--warmup-ratio", "0", "--top-p", "1.0", "--no-mask-truncated-completions", "--logging-steps", "2"]

# Runs `fp16rl train` with save_checkpoint patched to SIGKILL the process while step KILL_STEP's
# checkpoint is half written (weights and optimizer state on disk, manifest not yet, not renamed).
KILLER = """
import os, signal, sys
import fp16rl.checkpoint as checkpoint
write_manifest = checkpoint._write_manifest
def killing_write_manifest(folder):
    if folder.name.startswith(".step-{step}."):
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(folder)
checkpoint._write_manifest = killing_write_manifest
from fp16rl.cli import app
sys.argv = ["fp16rl", "train", *sys.argv[1:]]
app()
"""


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def _run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "fp16rl.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_kill_during_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path):
    reference = tmp_path / "reference"  # through the CLI too: the same threads, so the same numbers
    assert _run_cli([*TRAIN_ARGS, "--max-steps", "4", "--save-steps", "1", "--output-dir", str(reference)]).returncode == 0
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER.format(step=3), *TRAIN_ARGS, "--max-steps", "4",
                             "--save-steps", "1", "--output-dir", str(run)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in checkpoint_dirs(run)] == ["step-1", "step-2"]
    assert checkpoint_problem(run / "checkpoints" / "step-2") is None  # intact, every file's hash matches
    assert list((run / "checkpoints").glob(".step-3.*"))  # the torn save is only a temporary folder
    resumed = _run_cli(["--output-dir", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "checkpoints").glob(".step-3.*"))
    assert _comparable(read_metrics(run / "metrics.jsonl")) == _comparable(read_metrics(reference / "metrics.jsonl"))


def test_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic.atomic_write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
    # The data under its temporary name before the rename, then the folder holding the new name.
    assert synced[0].startswith(str(tmp_path / "a" / ".config.yaml.")) and synced[1] == str(tmp_path / "a")
    assert (tmp_path / "a" / "config.yaml").read_text() == "x: 1\n"
    synced.clear()
    trainer = Trainer(toy_config(tmp_path / "run", max_steps=1))
    synced.clear()
    trainer.save(1)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    for name in ("trainable.safetensors", "training_state.pt", "trainer_state.json", "manifest.json"):
        assert any(path.endswith(name) for path in synced), name
    assert str(step.parent) in synced  # the rename itself is made durable


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        Trainer(toy_config(tmp_path / "run", max_steps=1, save_steps=1)).train(show_progress=False)
    finally:
        os.umask(umask)
    run = tmp_path / "run"
    for path in (run / "config.yaml", run / "summary.json", run / "metrics.jsonl",
                 run / "checkpoints" / "step-1" / "trainer_state.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (run / "checkpoints" / "step-1").stat().st_mode & 0o777 == 0o755


def test_interrupt_mid_step_saves_the_last_completed_step_and_resume_is_exact(tmp_path):
    """A SIGINT while step 3 is sampling: the step is abandoned, step 2 is saved, nothing else changes."""
    reference = tmp_path / "reference"
    Trainer(toy_config(reference, max_steps=4, save_steps=100)).train(show_progress=False)
    trainer = Trainer(toy_config(tmp_path / "run", max_steps=4, save_steps=100))
    generate = trainer.sampler.generate
    calls = []

    def generate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag; decoding polls it
        return generate(*args, **kwargs)

    trainer.sampler.generate = generate_then_interrupt
    after_step_2 = {}

    def record(step, metrics, log=trainer.tracker.log):
        log(step, metrics)
        if step == 2:
            after_step_2.update({n: m.detach().clone() for n, m in trainer.weights.named_masters().items()})

    trainer.tracker.log = record
    trainer.train(show_progress=False)
    assert trainer.status == "interrupted" and trainer.saved_steps == {2}
    assert all(torch.equal(after_step_2[n], m) for n, m in trainer.weights.named_masters().items())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_completed"] == 2
    Trainer(toy_config(tmp_path / "run", max_steps=4, save_steps=100, resume=True)).train(show_progress=False)
    assert _comparable(read_metrics(tmp_path / "run" / "metrics.jsonl")) == _comparable(
        read_metrics(reference / "metrics.jsonl"))


def test_ctrl_c_on_the_cli_stops_with_a_checkpoint_and_plain_progress_lines(tmp_path):
    """The CLI run gets SIGINT once; it prints one plain progress line per step (stderr is not a
    terminal), saves, records status interrupted and exits 130; --resume then finishes the run."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fp16rl.cli", "train", *TRAIN_ARGS, "--max-steps", "400",
                                "--save-steps", "1000", "--output-dir", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(read_metrics(run / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    done = len(read_metrics(run / "metrics.jsonl"))
    assert 2 <= done < 400
    assert [p.name for p in checkpoint_dirs(run)] == [f"step-{done}"]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert f"interrupted after step {done}" in stderr
    progress = [line for line in stderr.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in progress] == [f"{k}/400" for k in range(1, done + 1)]
    assert "reward" in progress[0] and "s/step" in progress[0]
    resumed = _run_cli(["--output-dir", str(run), "--resume", "--max-steps", str(done + 1)])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, done + 2))
