"""A run survives being killed: checkpoints are atomic and fsync'ed, Ctrl-C saves and stops at a safe
point, and --resume continues exactly in both cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fp16rl.core import atomic
from fp16rl.runs.checkpoint import checkpoint_dirs, checkpoint_problem
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer
from support import toy_config

TRAIN_ARGS = ["--model-path", "tiny", "--dataset-path", "toy:digits", "--dtype", "float32", "--lora-r", "0",
              "--learning-rate", "2e-3", "--num-generations", "8", "--prompts-per-step", "4",
              "--max-completion-length", "24", "--max-seq-length", "256", "--beta", "0", "--max-grad-norm", "1.0",
              "--warmup-ratio", "0", "--top-p", "1.0", "--no-mask-truncated-completions", "--logging-steps", "2"]

# Runs `fp16rl train` with save_checkpoint patched to SIGKILL the process while step KILL_STEP's
# checkpoint is half written (weights and optimizer state on disk, manifest not yet, not renamed).
KILLER = """
import os, signal, sys
import fp16rl.training.checkpoint_io as checkpoint_io
write_manifest = checkpoint_io.write_manifest
def killing_write_manifest(folder):
    if folder.name.startswith(".step-{step}."):
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(folder)
checkpoint_io.write_manifest = killing_write_manifest
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
                 run / "checkpoints" / "step-1" / "trainer_state.json",
                 run / "checkpoints" / "step-1" / "trainable.safetensors"):  # safetensors writes 0600 itself
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (run / "checkpoints" / "step-1").stat().st_mode & 0o777 == 0o755


def test_atomic_directory_gives_what_libraries_wrote_privately_the_usual_permissions(tmp_path):
    """Issue 23: safetensors (>= 0.6) writes 0600 files, so exported models were unreadable to others."""
    from safetensors.torch import save_file

    private = tmp_path / "private.txt"
    private.write_text("secret")
    private.chmod(0o600)
    umask = os.umask(0o027)
    try:
        with atomic.atomic_directory(tmp_path / "model") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
            os.symlink(private, tmp / "link")
    finally:
        os.umask(umask)
    model = tmp_path / "model"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (model, *model.rglob("*")) if not p.is_symlink()}
    assert modes == {"model": 0o750, "model.safetensors": 0o640, "sub": 0o750, "run.sh": 0o750}
    assert private.stat().st_mode & 0o777 == 0o600  # a link is not followed


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


# `fp16rl train` with the run tracker patched to send this process SIGINT right after the run folder and
# its first files exist: a first Ctrl-C during start-up, before the stop handler is installed.
START_UP_CTRL_C = """
import os, signal, sys
import fp16rl.training.trackers as tracking
start = tracking.RunTracker.__init__
def interrupted_start(self, *args, **kwargs):
    start(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
tracking.RunTracker.__init__ = interrupted_start
from fp16rl.cli import app
sys.argv = ["fp16rl", "train", *sys.argv[1:]]
app()
"""


def _assert_start_up_stop(done: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 130, no traceback, one line that says start-up and advises no --resume (no checkpoint exists)."""
    assert done.returncode == 130, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr and "second signal" not in done.stderr and "--resume" not in done.stderr


def test_first_ctrl_c_during_start_up_stops_cleanly_and_leaves_the_folder_as_found(tmp_path):
    """Issue 23: a first Ctrl-C during start-up printed the second signal's message and advised --resume
    where no run folder existed. Once while the checks import a reward module (nothing written yet), once
    after the run folder's first files were written (they are removed: nothing was trained)."""
    (tmp_path / "rows.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    (tmp_path / "ctrl_c.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
                                        "def fine(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    checks = _run_cli(["--dataset-path", str(tmp_path / "rows.jsonl"), "--reward-funcs",
                       f"{tmp_path / 'ctrl_c.py'}:fine", "--output-dir", str(tmp_path / "run")])
    _assert_start_up_stop(checks, "interrupted during start-up: nothing was written")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()  # a folder the user made: it stays, empty again
    loading = subprocess.run([sys.executable, "-c", START_UP_CTRL_C, *TRAIN_ARGS, "--max-steps", "1",
                              "--output-dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=600)
    _assert_start_up_stop(loading, "interrupted during start-up, before step 1: nothing was trained or kept")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_run_that_fails_at_step_1_leaves_a_folder_that_is_reused(tmp_path):
    """Issue 23: a run that failed at step 1 left a folder neither --resume nor a new run would take. Now
    --resume says why not, and the same command starts again in it, with a warning."""
    (tmp_path / "rows.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    (tmp_path / "rewards.py").write_text("def breaks(completions, **kwargs):\n    if len(completions) > 1:\n"
                                         "        raise RuntimeError('broken at step 1')\n"
                                         "    return [0.0] * len(completions)\n")
    run = tmp_path / "run"
    args = ["--model-path", "tiny", "--dataset-path", str(tmp_path / "rows.jsonl"), "--dtype", "float32",
            "--lora-r", "0", "--num-generations", "2", "--prompts-per-step", "1", "--max-completion-length", "4",
            "--max-seq-length", "128", "--max-steps", "1", "--output-dir", str(run)]
    failed = _run_cli([*args, "--reward-funcs", f"{tmp_path / 'rewards.py'}:breaks"])
    assert failed.returncode == 2 and "broken at step 1" in failed.stderr, failed.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "failed" and not checkpoint_dirs(run)
    resumed = _run_cli([*args, "--resume"])
    assert resumed.returncode == 2 and resumed.stderr.count("error:") == 1, resumed.stderr
    assert "its run failed before step 1: start it again without --resume" in resumed.stderr
    again = _run_cli([*args, "--reward-funcs", "math"])
    assert again.returncode == 0, again.stderr
    assert "holds a run that failed before its first step and saved nothing to resume; reusing" in again.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]


def test_only_a_folder_without_anything_of_value_is_reused(tmp_path):
    """The rules of ``run_reuse``: a user's file, a logged step, a checkpoint, a sample or a run that has not
    ended (no summary.json: it may be starting up right now) keep a folder in use; the messages of a
    stopped run advise --resume only where a checkpoint exists."""
    from fp16rl.cli.interrupts import next_move
    from fp16rl.runs.reuse import discard_run_entries, ended_before_step_one

    def leftover(name: str, summary: str | None = "failed") -> Path:
        run = tmp_path / name
        (run / "samples").mkdir(parents=True)
        (run / "tb").mkdir()
        (run / "tb" / "events.out").write_text("x")
        (run / "checkpoints" / ".step-1.tmp").mkdir(parents=True)  # a torn save
        (run / "metrics.jsonl").write_text("")
        (run / "config.yaml").write_text("config: {}\n")
        if summary:
            (run / "summary.json").write_text(json.dumps({"status": summary}))
        return run

    assert ended_before_step_one(leftover("failed")) == "failed"
    assert ended_before_step_one(leftover("interrupted", "interrupted")) == "interrupted"
    assert "run the same command to start again" in next_move(tmp_path / "failed")
    assert ended_before_step_one(leftover("live", None)) is None
    assert ended_before_step_one(leftover("finished", "finished")) is None
    (leftover("users") / "notes.txt").write_text("precious")
    (leftover("logged") / "metrics.jsonl").write_text('{"step": 1}\n')
    (leftover("sampled") / "samples" / "step-1.jsonl").write_text("{}\n")
    (leftover("saved") / "checkpoints" / "step-1").mkdir()
    for name in ("users", "logged", "sampled", "saved"):
        assert ended_before_step_one(tmp_path / name) is None, name
    assert "continue with --resume" in next_move(tmp_path / "saved")
    assert "cannot be resumed" in next_move(tmp_path / "logged") and "--resume" not in next_move(tmp_path / "logged")
    discard_run_entries(tmp_path / "users")  # only what a run writes goes
    assert [p.name for p in (tmp_path / "users").iterdir()] == ["notes.txt"]
