"""Full-vocabulary parity (``--vocab-parity-positions``; ``rollout/vocab_rows.py``, ``measure/vocab.py``):
the rows kept are the sampler's and the trainer's whole distributions at the sampled positions, the
metrics equal an independent float64 computation on them, and the positions are a deterministic,
bounded bottom-k sample of the completion tokens."""

import json
import math

import numpy as np
import pytest
import torch

from fp16rl.algo.mismatch import vocab_divergences, vocab_metrics
from fp16rl.core.errors import ConfigError
from fp16rl.learner.distributed import DataParallel
from fp16rl.learner.logprobs import LogitHead
from fp16rl.measure.rollouts import RolloutRequest, TrainerForward, measure_rollouts
from fp16rl.measure.vocab import vocab_parity_metrics
from fp16rl.model.loading import load_model
from fp16rl.model.precision import PrecisionPolicy
from fp16rl.rollout.noise import row_keys
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.rollout.vocab_rows import priorities
from support import toy_config

VOCAB_KEYS = {"mismatch/vocab_kl", "mismatch/vocab_kl_max", "mismatch/vocab_tv", "mismatch/vocab_tv_max",
              "mismatch/vocab_positions"}


def _prompts(tokenizer, count=3):
    return [tokenizer(f"Count from {i * 7}: " * (1 + i % 2))["input_ids"] for i in range(count)]


def _measure(tiny_path, tokenizer, dtype, positions, temperature=1.0, max_rows=None, seed=5):
    """One measurement of the tiny model (3 prompts x 4 completions, up to 20 tokens)."""
    policy = PrecisionPolicy.from_options(dtype)
    model = load_model(tiny_path)
    sampler = Sampler(model, policy.sampler_dtype, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    forward = TrainerForward(model, LogitHead.of(model), policy, temperature, rows=5, chunk_tokens=7)
    params = SamplingParams(max_new_tokens=20, temperature=temperature)
    request = RolloutRequest(_prompts(tokenizer), 4, params, seed, range(3), max_rows, positions)
    return model, sampler, measure_rollouts(sampler, request, forward, tokenizer.pad_token_id)


def _float64_reference(sampler_rows: torch.Tensor, trainer_rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """KL(mu || pi) and TV per row in numpy float64, each row renormalised by its own log-sum-exp."""
    def normalised(rows):
        x = rows.double().numpy()
        top = x.max(axis=1, keepdims=True)
        return x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))

    lmu, lpi = normalised(sampler_rows), normalised(trainer_rows)
    mu, pi = np.exp(lmu), np.exp(lpi)
    return (mu * (lmu - lpi)).sum(axis=1), 0.5 * np.abs(mu - pi).sum(axis=1)


@pytest.mark.parametrize("dtype,temperature", [("bfloat16", 1.0), ("float16", 0.7)])
def test_vocab_metrics_equal_an_independent_float64_computation(tiny_path, tiny_tokenizer, dtype, temperature):
    _, _, measured = _measure(tiny_path, tiny_tokenizer, dtype, positions=16, temperature=temperature)
    parity, rollouts = measured.vocab, measured.rollouts
    assert len(parity.sampler) == 16 and bool(parity.taken.all())
    rows, columns = parity.sampler.rows, parity.sampler.columns
    tokens = rollouts.completion_ids[rows, columns]
    assert bool(rollouts.completion_mask[rows, columns].all())  # every kept position is a completion token
    # The kept rows are the ones each side scored its token with: the sampler's bit for bit (mu), the
    # trainer's to the rounding of another head batch shape (pi_old).
    assert torch.equal(parity.sampler.logprobs.gather(1, tokens[:, None]).squeeze(1),
                       rollouts.sampler_logprobs[rows, columns])
    torch.testing.assert_close(parity.trainer.gather(1, tokens[:, None]).squeeze(1),
                               measured.old_logprobs[rows, columns], rtol=0, atol=1e-5)
    kl, tv = _float64_reference(parity.sampler.logprobs, parity.trainer)
    metrics = vocab_parity_metrics(parity, DataParallel())
    assert set(metrics) == VOCAB_KEYS
    assert metrics["mismatch/vocab_kl"] == pytest.approx(kl.mean(), rel=1e-9, abs=1e-15)
    assert metrics["mismatch/vocab_kl_max"] == pytest.approx(kl.max(), rel=1e-9, abs=1e-15)
    assert metrics["mismatch/vocab_tv"] == pytest.approx(tv.mean(), rel=1e-9, abs=1e-15)
    assert metrics["mismatch/vocab_tv_max"] == pytest.approx(tv.max(), rel=1e-9, abs=1e-15)
    assert metrics["mismatch/vocab_positions"] == 16
    assert metrics["mismatch/vocab_kl"] > 0 and metrics["mismatch/vocab_tv"] > 0  # half precision differs


def test_rows_are_each_engines_own_distribution_at_the_position(tiny_path, tiny_tokenizer):
    """fp32: both sides' kept rows equal the model's own full forward at the position that predicts the
    kept token (no off-by-one between the sampler's step t, the trainer's hidden state and the token)."""
    model, sampler, measured = _measure(tiny_path, tiny_tokenizer, "float32", positions=12, temperature=0.8)
    parity, rollouts = measured.vocab, measured.rollouts
    for k in range(len(parity.sampler)):
        row, column = int(parity.sampler.rows[k]), int(parity.sampler.columns[k])
        prompt = rollouts.prompt_ids[row // 4]
        ids = torch.tensor([prompt + rollouts.completion_ids[row, :column].tolist()])
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=ids).logits[0, -1].float() / 0.8, dim=-1)
        torch.testing.assert_close(parity.sampler.logprobs[k], expected, rtol=0, atol=2e-5)
        torch.testing.assert_close(parity.trainer[k], expected, rtol=0, atol=2e-5)


def test_positions_are_the_bottom_k_of_a_seeded_hash_and_deterministic(tiny_path, tiny_tokenizer):
    _, _, first = _measure(tiny_path, tiny_tokenizer, "float32", positions=10)
    _, _, split = _measure(tiny_path, tiny_tokenizer, "float32", positions=10, max_rows=4)  # three decode calls
    _, _, other_seed = _measure(tiny_path, tiny_tokenizer, "float32", positions=10, seed=6)
    chosen = {(int(r), int(c)) for r, c in zip(first.vocab.sampler.rows, first.vocab.sampler.columns)}
    assert len(chosen) == 10
    assert chosen == {(int(r), int(c)) for r, c in zip(split.vocab.sampler.rows, split.vocab.sampler.columns)}
    assert chosen != {(int(r), int(c)) for r, c in zip(other_seed.vocab.sampler.rows,
                                                       other_seed.vocab.sampler.columns)}
    # By brute force: the 10 completion tokens of smallest priority (the documented rule).
    mask, keys = first.rollouts.completion_mask, row_keys(5, range(3), 4)
    every = [(int(priorities(keys[r:r + 1], t)[0]), r, t) for r in range(mask.shape[0]) for t in range(mask.shape[1])
             if mask[r, t]]
    assert chosen == {(r, t) for _, r, t in sorted(every)[:10]}
    assert torch.equal(first.vocab.sampler.priority, torch.sort(first.vocab.sampler.priority).values)


def test_sample_is_bounded_by_the_tokens_and_off_keeps_nothing(tiny_path, tiny_tokenizer):
    _, _, everything = _measure(tiny_path, tiny_tokenizer, "float32", positions=10_000)
    assert len(everything.vocab.sampler) == int(everything.rollouts.completion_mask.sum())
    _, _, off = _measure(tiny_path, tiny_tokenizer, "float32", positions=0)
    assert off.rollouts.vocab is None and off.vocab is None
    assert vocab_parity_metrics(off.vocab, DataParallel()) == {}


def test_divergences_by_hand_and_zero_for_equal_rows():
    mu, pi = torch.tensor([[0.5, 0.3, 0.2, 0.0]]), torch.tensor([[0.4, 0.4, 0.1, 0.1]])
    kl, tv = vocab_divergences(mu.log(), pi.log())
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(2.0))
    assert tv.item() == pytest.approx(0.5 * (0.1 + 0.1 + 0.1 + 0.1))
    rows = torch.log_softmax(torch.randn(5, 33, generator=torch.Generator().manual_seed(0)), dim=-1)
    kl, tv = vocab_divergences(rows, rows.clone())
    assert kl.abs().max().item() < 1e-15 and tv.max().item() == 0
    assert vocab_metrics(kl[:0], tv[:0]) == {}


def test_training_logs_the_vocab_metrics_and_off_logs_none(tmp_path, tiny_path):
    from fp16rl.runs.tracking import read_metrics
    from fp16rl.training.trainer import Trainer

    on = Trainer(toy_config(tmp_path / "on", max_steps=2, vocab_parity_positions=8, dtype="float16"))
    on.train(show_progress=False)
    records = read_metrics(on.run_dir / "metrics.jsonl")
    assert all(VOCAB_KEYS <= set(r) and r["mismatch/vocab_positions"] == 8 for r in records)
    assert all(0 < r["mismatch/vocab_kl"] < 1e-3 for r in records)  # step 2: from the training forward
    off = Trainer(toy_config(tmp_path / "off", max_steps=1, vocab_parity_positions=0))
    off.train(show_progress=False)
    assert not any("vocab" in key for key in read_metrics(off.run_dir / "metrics.jsonl")[0])


def test_option_is_validated():
    with pytest.raises(ConfigError, match="--vocab-parity-positions must be >= 0"):
        toy_config("/tmp/unused", vocab_parity_positions=-1).validate()


def test_probe_reports_the_vocab_metrics_by_position_and_probability(tmp_path, tiny_path):
    from typer.testing import CliRunner

    from fp16rl.cli import app

    out = tmp_path / "probe"
    result = CliRunner().invoke(app, ["probe", "--model-path", "tiny", "--dtypes", "float32,bf16", "--batch-sizes", "2",
                                      "--num-samples", "4", "--max-new-tokens", "12", "--no-check-fp16-range",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    fp32, bf16 = json.loads((out / "probe.json").read_text())["configs"]
    for config in (fp32, bf16):
        assert VOCAB_KEYS <= set(config["metrics"])
        strata = config["vocab_strata"]
        assert set(strata) == {"by_position", "by_token_probability"} and "t=0" in strata["by_position"]
        for kind in strata.values():  # every compared position falls in one stratum of each kind
            assert sum(s["positions"] for s in kind.values()) == config["metrics"]["mismatch/vocab_positions"]
        assert config["metrics"]["mismatch/vocab_positions"] == config["metrics"]["probe/num_tokens"]  # < 512
    assert fp32["metrics"]["mismatch/vocab_kl"] < 1e-9 < bf16["metrics"]["mismatch/vocab_kl"]
    markdown = (out / "probe.md").read_text()
    assert "## Full-vocabulary parity" in markdown and "| bfloat16 sdpa bs2 | position | t=0 |" in markdown


@pytest.mark.parametrize("options", [dict(algorithm="ppo", lora_r=8, lora_alpha=16),
                                     dict(algorithm="online_dpo", dtype="bfloat16")], ids=["ppo-lora", "online-dpo"])
def test_ppo_and_online_dpo_log_the_vocab_metrics(tmp_path, tiny_path, options):
    from fp16rl.runs.tracking import read_metrics
    from fp16rl.training.trainer import Trainer

    trainer = Trainer(toy_config(tmp_path / "run", max_steps=2, vocab_parity_positions=8, **options))
    trainer.train(show_progress=False)
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert all(VOCAB_KEYS <= set(r) and r["mismatch/vocab_positions"] == 8 for r in records)
    if options.get("dtype") == "bfloat16":
        assert all(r["mismatch/vocab_kl"] > 0 for r in records)
