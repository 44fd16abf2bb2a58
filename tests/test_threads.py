"""CPU threads are resolved once per run and once per comparison: the count orders the floating-point sums,
so a resume or an arm computing with another count than its run or its siblings is not bitwise comparable."""

from __future__ import annotations

import pytest
import torch
import yaml

from fp16rl.config.parse import parse_train_args
from fp16rl.compare import plan_comparison
from fp16rl.training.trainer import Trainer

from support import toy_config


@pytest.fixture
def thread_pool(monkeypatch) -> dict[str, int]:
    """torch's intra-op pool faked (the tests keep computing on one thread): what was set is what is read;
    ``auto`` is what the automatic count would pick now (it follows the machine's load)."""
    pool = {"threads": torch.get_num_threads(), "auto": 3}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pool.update(threads=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: pool["threads"])
    monkeypatch.setattr("fp16rl.model.hardware.auto_threads", lambda device: pool["auto"])
    return pool


def _recorded(run_dir) -> int:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["cpu_threads"]


def test_resume_computes_with_the_recorded_thread_count(tmp_path, thread_pool):
    """The run resolves 3 threads and records them; at its resume the automatic count would be 2 (a busier
    machine), but the resume computes with the recorded 3, silently. An explicit other --threads is obeyed,
    with a warning that the resume is then not bitwise exact."""
    run = tmp_path / "run"
    Trainer(toy_config(run, max_steps=1, save_steps=1, num_generations=2, prompts_per_step=2)).train(
        show_progress=False)
    assert _recorded(run) == 3
    thread_pool["auto"] = 2
    resumed = Trainer(toy_config(run, max_steps=2, resume=True, num_generations=2, prompts_per_step=2))
    assert thread_pool["threads"] == 3 and _recorded(run) == 3
    assert not any("threads" in note for note in resumed.notes)
    explicit = Trainer(toy_config(run, max_steps=2, resume=True, threads=2, num_generations=2, prompts_per_step=2))
    assert thread_pool["threads"] == 2
    assert [note for note in explicit.notes if "--threads 2 differs from the 3 CPU threads" in note
            and "not bitwise" in note]
    assert Trainer(toy_config(tmp_path / "other", threads=3)).notes == []  # a new run: nothing to differ from


def test_every_arm_of_a_comparison_gets_one_thread_count(tmp_path, monkeypatch):
    """Resolved once when the comparison is planned, kept in compare.json and passed to every run as --threads;
    re-planning (missing or interrupted runs) keeps it though the machine's idle cores changed; an arm or base
    config that sets --threads keeps its own."""
    idle = {"cores": 2}
    monkeypatch.setattr("fp16rl.compare.comparison_threads", lambda parallel: idle["cores"] // parallel)
    base = tmp_path / "base.yaml"
    base.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 2\n")
    arms = ["dtype=bfloat16", "dtype=float16", "dtype=float32,threads=1"]
    specs = plan_comparison(base, arms, [0, 1], tmp_path / "cmp")
    threads = [parse_train_args(spec.train_args(base)).threads for spec in specs]
    assert threads == [2, 2, 2, 2, 1, 1]
    idle["cores"] = 1
    again = plan_comparison(base, arms, [0, 1], tmp_path / "cmp")
    assert [parse_train_args(spec.train_args(base)).threads for spec in again] == threads
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text("model_path: tiny\ndataset_path: toy:digits\nmax_steps: 2\nthreads: 4\n")
    specs = plan_comparison(pinned, arms[:2], [0], tmp_path / "cmp-pinned")
    assert [parse_train_args(spec.train_args(pinned)).threads for spec in specs] == [4, 4]
