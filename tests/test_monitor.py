"""The collapse monitor flags collapsing metric streams and leaves healthy noisy ones alone."""

import json

import numpy as np
import pytest

from fp16rl.training.monitor import CollapseMonitor
from fp16rl.tasks.base import PromptItem
from fp16rl.core.scores import Scores


def healthy_stream(seed: int, steps: int = 300):
    """A run that learns and then plateaus, with realistic step-to-step noise."""
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        yield step, {
            "reward/mean": min(0.8, 0.1 + step / 200) + rng.normal(0, 0.08),
            "optim/loss": rng.normal(0, 0.1),
            "completion/truncated_ratio": float(np.clip(0.1 + rng.normal(0, 0.08), 0, 1)),
            "completion/unique_ngram_ratio_4": float(np.clip(0.9 + rng.normal(0, 0.05), 0, 1)),
            "mismatch/token_kl_k3": abs(1e-5 * (1 + rng.normal(0, 0.5))),
            "optim/step_skipped": float(rng.random() < 0.02),
            "arc/copy_fraction": float(np.clip(0.03 + rng.normal(0, 0.03), 0, 1)),
        }


def run(stream):
    monitor = CollapseMonitor()
    for step, metrics in stream:
        monitor.update(step, metrics)
    return monitor.event


@pytest.mark.parametrize("seed", range(5))
def test_healthy_noisy_runs_are_not_flagged(seed):
    assert run(healthy_stream(seed)) is None


def collapsing(seed: int, at: int, change):
    for step, metrics in healthy_stream(seed):
        if step >= at:
            change(step - at, metrics)
        yield step, metrics


@pytest.mark.parametrize("rule,change", [
    ("reward_drop", lambda k, m: m.update({"reward/mean": 0.05})),
    ("truncation_surge", lambda k, m: m.update({"completion/truncated_ratio": 0.8})),
    ("repetition_surge", lambda k, m: m.update({"completion/unique_ngram_ratio_4": 0.2})),
    ("mismatch_explosion", lambda k, m: m.update({"mismatch/token_kl_k3": 1e-5 * 10 ** min(4, k / 3)})),
    ("skipped_steps", lambda k, m: m.update({"optim/step_skipped": 1.0})),
    ("non_finite", lambda k, m: m.update({"optim/loss": float("nan")})),
    ("reward_hacking", lambda k, m: m.update({"arc/copy_fraction": 0.5})),
])
def test_collapses_are_flagged_soon_after_onset(rule, change):
    event = run(collapsing(0, 200, change))
    assert event is not None and event.rule == rule, event
    assert 200 <= event.step <= 225, event
    assert event.detail


def test_a_reward_drop_that_comes_with_copying_is_named_reward_hacking():
    event = run(collapsing(1, 200, lambda k, m: m.update({"reward/mean": 0.05, "arc/copy_fraction": 0.9})))
    assert event.rule == "reward_hacking" and 200 <= event.step <= 215, event
    assert "copying shown outputs 0." in event.detail


def test_a_reward_drop_without_copying_says_so():
    event = run(collapsing(2, 200, lambda k, m: m.update({"reward/mean": 0.05})))
    assert event.rule == "reward_drop" and "copy share 0.0" in event.detail, event


def test_brief_copy_spikes_and_a_steady_share_do_not_fire():
    spikes = collapsing(3, 100, lambda k, m: m.update({"arc/copy_fraction": 0.9 if k % 40 == 0 else 0.03}))
    assert run(spikes) is None
    steady = ((s, {"arc/copy_fraction": 0.3 + 0.05 * (s % 2)}) for s in range(1, 300))
    assert run(steady) is None


def test_nan_written_as_string_counts():
    monitor = CollapseMonitor()
    assert monitor.update(1, {"reward/mean": "nan"}).rule == "non_finite"


def test_a_run_that_never_learned_does_not_collapse_on_reward():
    stream = ((s, {"reward/mean": 0.05 + 0.01 * (s % 3)}) for s in range(1, 200))
    assert run(stream) is None


class ScriptedTask:
    """Rewards follow a script (up, then down), whatever the model writes."""

    name = "scripted"
    num_steps_per_epoch = 100

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def batch(self, step, num_prompts):
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "go"}], tokenize=False,
                                                  add_generation_prompt=True)
        return [PromptItem(text=text, uid=f"s{step}", meta={"step": step}) for _ in range(num_prompts)]

    def score(self, items, completions, truncated, completion_ids=None, progress=None):
        step = items[0].meta["step"]
        level = 0.0 if step < 10 else (1.0 if step < 20 else 0.0)
        return Scores(rewards=[level + 0.01 * i for i in range(len(completions))])

    def close(self):
        pass


@pytest.mark.slow
def test_trainer_stops_on_collapse_and_writes_summary(tmp_path, tiny_tokenizer):
    from fp16rl.training.trainer import Trainer
    from support import toy_config

    config = toy_config(tmp_path / "run", max_steps=60, stop_on_collapse=True, max_completion_length=4,
                        num_generations=2, prompts_per_step=1, arm="scripted", save_steps=1000)
    trainer = Trainer(config, task=ScriptedTask(tiny_tokenizer))
    trainer.train(show_progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped_on_collapse" and summary["collapse_rule"] == "reward_drop"
    assert 20 < summary["collapse_step"] < 35 and summary["steps_completed"] == summary["collapse_step"]
    assert summary["arm"] == "scripted" and summary["best_reward"] > 0.9
    assert (tmp_path / "run" / "checkpoints" / f"step-{summary['collapse_step']}").is_dir()


def test_a_task_can_turn_off_a_rule_that_misreads_its_optimum():
    """toy:digits' best answers repeat 4-grams: its monitor ignores a repetition surge (which fired on every
    run of docs/results/sanity-toy.md) but still flags the other collapses."""
    from fp16rl.tasks.toy import DigitsTask
    from fp16rl.training.monitor import monitor_for

    def run_with(monitor, stream):
        for step, metrics in stream:
            monitor.update(step, metrics)
        return monitor.event

    repeating = lambda k, m: m.update({"completion/unique_ngram_ratio_4": 0.2})  # noqa: E731
    task = DigitsTask(tokenizer=None)
    assert run_with(monitor_for(task), collapsing(0, 200, repeating)) is None
    assert run_with(monitor_for(object()), collapsing(0, 200, repeating)).rule == "repetition_surge"
    dropping = lambda k, m: m.update({"reward/mean": 0.05})  # noqa: E731
    assert run_with(monitor_for(task), collapsing(0, 200, dropping)).rule == "reward_drop"
