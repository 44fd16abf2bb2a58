"""Asynchronous rollouts with bounded staleness (--max-staleness K) and the mismatch split into precision
and staleness (measure/staleness.py, training/pipeline.py, rollout/worker.py)."""

import json
import os
import signal

import pytest
import torch
import yaml

from fp16rl.algo.grpo import Correction
from fp16rl.algo.mismatch import mismatch_metrics
from fp16rl.core.errors import ConfigError
from fp16rl.core.scores import Scores
from fp16rl.learner.distributed import WholeBatch
from fp16rl.measure.staleness import FromStaleWeights, split_telemetry, staleness_metrics
from fp16rl.rollout.worker import WeightVersion, needed_versions, version_of
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.pipeline import WeightHistory, split_threads
from fp16rl.training.plan import check_ranks
from fp16rl.training.trainer import Trainer
from support import toy_config


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def _batch(seed: int = 0):
    """mu, the trainer at the sampling weights, the trainer at the current weights, and a ragged mask."""
    generator = torch.Generator().manual_seed(seed)
    mu = -torch.rand(6, 9, generator=generator) * 3
    stale = mu + 0.01 * torch.randn(6, 9, generator=generator)  # precision: small
    current = stale + 0.3 * torch.randn(6, 9, generator=generator)  # the policy moved: larger
    mask = torch.arange(9)[None, :] < torch.tensor([9, 3, 5, 9, 1, 7])[:, None]
    return mu * mask, stale * mask, current * mask, mask


def _whole(mu, current, mask):
    return WholeBatch(Scores(rewards=[0.0] * len(mu)), mu, mu, torch.ones_like(mu), current, mask, None,
                      [False] * len(mu), [[1]] * len(mu), slice(0, len(mu)))


def test_schedule_versions_and_what_a_checkpoint_keeps():
    # K = 0: step t samples with the weights after t-1 steps; K: after t-1-K, never before the initial ones.
    assert [version_of(t, 0) for t in (1, 2, 5)] == [0, 1, 4]
    assert [version_of(t, 2) for t in (1, 2, 3, 4, 6)] == [0, 0, 0, 1, 3]
    assert list(needed_versions(5, 2)) == [3, 4] and list(needed_versions(1, 3)) == [0]
    assert split_threads(2) == (1, 1) and split_threads(1) == (1, 1) and split_threads(5) == (2, 3)


def test_weight_history_keeps_what_steps_in_flight_need_and_round_trips():
    history = WeightHistory(max_staleness=2)
    for version in range(5):
        history.record(version, {"w": torch.full((2, 3), float(version)), "b": torch.tensor([version * 1.0])})
    assert sorted(history.versions) == [2, 3, 4]  # after step 4: versions 4-K .. 4
    saved = history.checkpoint_tensors(4)
    assert sorted(saved) == ["2/b", "2/w", "3/b", "3/w"]
    restored = WeightHistory(max_staleness=2)
    restored.load(saved, "ckpt")
    restored.require(4, "ckpt")
    assert torch.equal(restored.versions[3]["w"], torch.full((2, 3), 3.0))
    wider = WeightHistory(max_staleness=3)  # a resume with a larger K than the checkpoint was saved with
    wider.load(saved, "ckpt")
    with pytest.raises(ConfigError, match="keeps no weights of step 1"):
        wider.require(4, "ckpt")
    packed = WeightVersion.pack(7, {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1.5])})
    unpacked = packed.unpack()
    assert packed.version == 7 and torch.equal(unpacked["a"], torch.arange(6.0).view(2, 3))
    assert torch.equal(unpacked["b"], torch.tensor([1.5]))


def test_split_sums_to_the_full_off_policy_ratio():
    mu, stale, current, mask = _batch()
    whole = _whole(mu, current, mask)
    wide = Correction("token_truncate", clip_max=1e6, clip_min=0.0)  # no clipping: the weights are the ratios
    metrics, weights = split_telemetry(whole, stale, wide, "unprocessed", decoupled=False)
    full = mismatch_metrics(mu, current, mask)
    for name in ("token_kl_k1", "seq_kl"):  # log-ratios add: precision + staleness = the full ratio
        assert metrics[f"mismatch/{name}"] + metrics[f"staleness/{name}"] == pytest.approx(full[f"mismatch/{name}"],
                                                                                           abs=1e-5)
    assert metrics == {**metrics, **mismatch_metrics(mu, stale, mask), **staleness_metrics(stale, current, mask),
                       "mismatch/is_masked_ratio": 0.0}
    assert metrics["staleness/logp_abs_diff_mean"] > 10 * metrics["mismatch/logp_abs_diff_mean"]
    # The plain loss's IS weight corrects the whole ratio: w = (pi_stale / mu) (pi_old / pi_stale) per token.
    precision, moved = torch.exp(stale - mu), torch.exp(current - stale)
    assert torch.allclose(weights[mask], (precision * moved)[mask], rtol=1e-5)
    # --decoupled-loss: the IS weight is the precision part alone; the staleness is under the clip.
    _, decoupled = split_telemetry(whole, stale, wide, "unprocessed", decoupled=True)
    assert torch.allclose(decoupled[mask], precision[mask], rtol=1e-6)
    collector = FromStaleWeights(wide, mu, mask, stale=stale)
    part = collector.take(slice(0, 3), current[:3].clone().requires_grad_(), torch.zeros(3, 9))
    assert torch.equal(part, decoupled[:3]) and torch.equal(collector.old[:3], current[:3])


def test_options_refuse_what_async_rollouts_do_not_support(tmp_path):
    for options, match in [({"max_staleness": -1}, "--max-staleness must be >= 0"),
                           ({"max_staleness": 1, "algorithm": "ppo"}, "--max-staleness needs --algorithm grpo"),
                           ({"max_staleness": 1, "algorithm": "online_dpo"}, "--max-staleness needs --algorithm grpo"),
                           ({"decoupled_loss": True}, "--decoupled-loss clips against")]:
        with pytest.raises(ConfigError, match=match):
            toy_config(tmp_path / "run", **options).validate()
    with pytest.raises(ConfigError, match="launch it without torchrun"):
        check_ranks(toy_config(tmp_path / "run", max_staleness=1), world_size=2)
    with pytest.raises(ConfigError, match="4-bit"):
        toy_config(tmp_path / "run", max_staleness=1, load_in_4bit=True, lora_r=8).validate()


def test_a_script_reimported_in_the_sampler_process_is_refused(monkeypatch):
    """spawn imports the user's script again in the sampler process: a run built there (a script without
    the __main__ guard) is refused with a line that says what to do, before any model loads."""
    import multiprocessing

    from fp16rl.core.errors import UserError
    from fp16rl.training.pipeline import SAMPLER_PROCESS, refuse_in_sampler_process

    refuse_in_sampler_process()  # the learner's own process
    monkeypatch.setattr(multiprocessing.current_process(), "name", SAMPLER_PROCESS)
    with pytest.raises(UserError, match='if __name__ == "__main__"'):
        refuse_in_sampler_process()


class _FailingAt:
    """toy:digits whose prompts of one step cannot be made (as a dataset refuses a step's prompts)."""

    def __init__(self, inner, bad_step: int):
        self.inner, self.bad_step = inner, bad_step

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, step, num_prompts):
        if step == self.bad_step:
            raise ValueError(f"no prompts for step {step + 1}")
        return self.inner.batch(step, num_prompts)


def test_a_step_whose_prompts_fail_raises_at_that_step_and_leaves_no_process(tmp_path):
    """K = 1 makes step 3's job while step 1 trains; its error is raised when the run reaches step 3, as in
    the synchronous loop (steps 1-2 logged), and the sampler process and scoring thread are gone after."""
    import multiprocessing
    import threading

    from fp16rl.model.loading import load_tokenizer, model_folder
    from fp16rl.tasks import make_task

    config = toy_config(tmp_path / "run", max_steps=4, max_staleness=1, num_generations=2, prompts_per_step=2,
                        max_completion_length=8, report_to=["none"])
    task = _FailingAt(make_task(config, load_tokenizer(model_folder("tiny"))), bad_step=2)
    with pytest.raises(ValueError, match="no prompts for step 3"):
        Trainer(config, task=task).train(show_progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not multiprocessing.active_children()
    assert not [t for t in threading.enumerate() if t.name == "fp16rl-scorer"]


class _ScoredAfterMeasured:
    """toy:digits whose reward for step s waits (up to ``patience`` seconds, as on a remote verifier) until the
    learner has begun measuring step s's tokens, and records whether it saw that happen."""

    def __init__(self, inner, measuring, patience: float = 60.0):
        self.inner, self.measuring, self.patience, self.saw = inner, measuring, patience, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, items, completions, truncated, completion_ids=None, progress=None):
        step = progress.global_step + 1
        self.saw[step] = self.measuring[step].wait(self.patience)
        return self.inner.score(items, completions, truncated, completion_ids, progress)


def test_the_learner_measures_a_steps_tokens_while_its_rewards_wait(tmp_path, monkeypatch):
    """The trainer's forwards at the sampling and the current weights need the tokens, not the rewards: the
    learner runs them while a waiting reward scores the step (every reward saw its step being measured before
    it returned), and the run is the one a reward that does not wait gives."""
    import threading

    from fp16rl.model.loading import load_tokenizer, model_folder
    from fp16rl.tasks import make_task
    from fp16rl.training import pipeline

    measuring = {step: threading.Event() for step in range(1, 4)}
    taken = iter(range(1, 4))  # the learner measures steps in order

    def marking(*args, inputs=pipeline.trainer_inputs, **kwargs):
        measuring[next(taken)].set()
        return inputs(*args, **kwargs)

    monkeypatch.setattr(pipeline, "trainer_inputs", marking)
    options = dict(max_steps=3, max_staleness=1, num_generations=2, prompts_per_step=2, max_completion_length=8,
                   report_to=["none"])
    config = toy_config(tmp_path / "waits", **options)
    task = _ScoredAfterMeasured(make_task(config, load_tokenizer(model_folder("tiny"))), measuring)
    Trainer(config, task=task).train(show_progress=False)
    assert task.saw == {1: True, 2: True, 3: True}
    monkeypatch.undo()
    Trainer(toy_config(tmp_path / "plain", **options)).train(show_progress=False)
    assert (_comparable(read_metrics(tmp_path / "waits" / "metrics.jsonl"))
            == _comparable(read_metrics(tmp_path / "plain" / "metrics.jsonl")))


def test_fp32_k1_precision_part_is_zero_and_staleness_is_not(tmp_path):
    """fp32, K = 1, the decoupled loss: both engines at the weights that sampled agree (mismatch ~0) while
    the policy's move since then is measured (staleness > 0 from step 2, the first with stale weights)."""
    run = tmp_path / "run"
    Trainer(toy_config(run, max_steps=3, max_staleness=1, decoupled_loss=True, is_correction="token_truncate",
                       threads=2, num_generations=4, prompts_per_step=2, max_completion_length=16,
                       report_to=["none"])).train(show_progress=False)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["staleness/version_lag"] for r in records] == [0.0, 1.0, 1.0]
    assert all(r["mismatch/logp_abs_diff_mean"] < 1e-5 for r in records)
    assert records[0]["staleness/logp_abs_diff_mean"] == 0.0  # step 1 samples with the current weights
    assert all(r["staleness/logp_abs_diff_mean"] > 1e-3 for r in records[1:])
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["cpu_threads"] == 2 and stored["precision"]["engines_agree"] is True
    assert (run / "checkpoints" / "step-3" / "stale_weights.safetensors").is_file()
    from fp16rl.report.render import build_report

    build_report([run], tmp_path / "report")  # the staleness figure beside the mismatch figure
    assert (tmp_path / "report" / "staleness.png").is_file() and (tmp_path / "report" / "mismatch.png").is_file()


def test_stale_weights_are_swapped_in_cast_and_swapped_out(tmp_path):
    """The trainer's forward at the weights that sampled: the version cast into the compute copy (bf16 LoRA:
    the adapters), the policy's own weights back afterwards, the FP32 masters untouched."""
    from fp16rl.training.pipeline import at_weights

    weights = Trainer(toy_config(tmp_path / "run", dtype="bfloat16", lora_r=4, lora_alpha=8, max_steps=1,
                                 report_to=["none"])).weights
    assert weights.is_copy and {p.dtype for p in weights.params} == {torch.bfloat16}
    own, masters = [p.detach().clone() for p in weights.params], [m.detach().clone() for m in weights.masters]
    version = {name: master.detach() + 0.25 for name, master in weights.named_masters().items()}
    with at_weights(weights, version):
        assert all(torch.equal(p, version[n].to(torch.bfloat16)) for n, p in zip(weights.names, weights.params))
    assert all(torch.equal(p, o) for p, o in zip(weights.params, own))
    assert all(torch.equal(m, o) for m, o in zip(weights.masters, masters))


def test_bf16_precision_part_equals_the_synchronous_measurement(tmp_path):
    """bf16 LoRA, one thread per engine: step 1 samples the initial weights in both loops, so K = 1's
    precision part (mismatch/*) is exactly what K = 0 measures there."""
    options = dict(dtype="bfloat16", lora_r=4, lora_alpha=8, max_steps=1, threads=1, report_to=["none"])
    for name, staleness in (("sync", 0), ("async", 1)):
        Trainer(toy_config(tmp_path / name, max_staleness=staleness, **options)).train(show_progress=False)
    sync, fresh = (read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("sync", "async"))
    precision = {k: v for k, v in sync.items() if k.startswith("mismatch/")}
    assert precision["mismatch/logp_abs_diff_mean"] > 1e-4  # bf16: a real mismatch to compare
    assert precision == {k: fresh[k] for k in precision}


@pytest.mark.slow
def test_k1_is_deterministic_and_resume_after_ctrl_c_is_exact(tmp_path):
    """Two K = 1 runs log the same metrics whatever the timing; a run stopped by Ctrl-C after step 2 and
    resumed (its in-flight step 3 regenerated from the checkpoint's weights) equals them."""
    options = dict(max_steps=4, max_staleness=1, threads=2, is_correction="token_truncate", save_steps=100)
    Trainer(toy_config(tmp_path / "a", **options)).train(show_progress=False)
    trainer = Trainer(toy_config(tmp_path / "b", **options))

    def log_then_interrupt(step, metrics, log=trainer.tracker.log):
        log(step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler sets a flag; the run stops after this step

    trainer.tracker.log = log_then_interrupt
    trainer.train(show_progress=False)
    assert trainer.status == "interrupted" and trainer.saved_steps == {2}
    assert not trainer.pipeline.process.is_alive()
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps_completed"] == 2
    Trainer(toy_config(tmp_path / "b", resume=True, **options)).train(show_progress=False)
    first = _comparable(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert first == _comparable(read_metrics(tmp_path / "b" / "metrics.jsonl"))


@pytest.mark.slow
def test_compare_of_two_k1_arms_stays_paired(tmp_path):
    """Two K = 1 arms of a comparison that differ in the learning rate: steps 1 and 2 sample with the same
    (initial) weights in both, so their completions are the same, token for token (the same random numbers
    per seed, step, prompt, sample and position); step 3's prompts are the same, its weights not."""
    from fp16rl.compare import run_comparison

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model_path": "tiny", "dataset_path": "toy:digits", "dtype": "float32", "lora_r": 0, "num_generations": 4,
        "prompts_per_step": 2, "max_completion_length": 16, "max_seq_length": 256, "max_steps": 3, "beta": 0.0,
        "top_p": 1.0, "save_samples_steps": 1, "warmup_ratio": 0.0, "max_staleness": 1, "report_to": ["none"],
        "mask_truncated_completions": False}))  # the completions run to the limit: they must train
    arms = ["learning-rate=0.002", "learning-rate=0.02"]
    outcomes = run_comparison(base, arms, [1], tmp_path / "cmp")
    assert set(outcomes.values()) == {"finished"}, outcomes

    def samples(arm, step):
        path = tmp_path / "cmp" / "runs" / arm / "seed-1" / "samples" / f"step-{step:06d}.jsonl"
        return [(r["uid"], r["prompt"], r["completion"]) for r in map(json.loads, path.read_text().splitlines())]

    for step in (1, 2):
        assert samples(arms[0], step) == samples(arms[1], step)
    assert [s[:2] for s in samples(arms[0], 3)] == [s[:2] for s in samples(arms[1], 3)]
    assert samples(arms[0], 3) != samples(arms[1], 3)
