"""The sampler: logprobs equal the trainer's in fp32, the bf16 mismatch is clearly larger than fp16,
sampling is seeded, and processing (top-p/top-k/penalty) shapes the draw but not the logprobs."""

import math

import pytest
import torch

from fp16rl.learner.logprobs import completion_logprobs

from fp16rl.model.forward import build_token_batch
from fp16rl.model.loading import LoraSettings, apply_lora, load_model
from fp16rl.model.precision import PrecisionPolicy
from fp16rl.model.forward import left_pad
from fp16rl.rollout.draw import draw_tokens, process_logits
from fp16rl.rollout.noise import TokenNoise, row_keys
from fp16rl.rollout.sampler import Sampler, SamplingParams


def _prompts(tokenizer, count=4):
    texts = [f"Write a sequence of digits. Count from {i * 7}." * (1 + i % 2) for i in range(count)]
    return [tokenizer(t)["input_ids"] for t in texts]


def _mismatch(tiny_path, tokenizer, dtype, n=8, max_new=48, lora=False):
    """Mean and max |trainer - sampler| logprob on the same tokens, both sides in ``dtype``."""
    policy = PrecisionPolicy.from_options(dtype)
    model = load_model(tiny_path)
    if lora:
        model = apply_lora(model, LoraSettings(r=4, alpha=8))
    sampler = Sampler(model, policy.sampler_dtype, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    rollouts = sampler.generate(_prompts(tokenizer), n, SamplingParams(max_new_tokens=max_new), seed=0)
    batch = build_token_batch(rollouts.prompt_ids, n, rollouts.completion_ids, rollouts.completion_mask,
                              tokenizer.pad_token_id)
    with torch.no_grad(), policy.autocast("cpu"):
        trainer_lp, _ = completion_logprobs(model, batch)
    diff = (trainer_lp - rollouts.sampler_logprobs)[rollouts.completion_mask].abs()
    return diff.mean().item(), diff.max().item(), rollouts


def test_fp32_sampler_and_trainer_agree(tiny_path, tiny_tokenizer):
    mean, worst, rollouts = _mismatch(tiny_path, tiny_tokenizer, "float32")
    assert rollouts.completion_mask.sum() > 100
    assert worst <= 1e-5, worst
    assert rollouts.observed_dtype["compute_dtype"] == "float32"


def test_fp32_agreement_with_lora(tiny_path, tiny_tokenizer):
    _, worst, _ = _mismatch(tiny_path, tiny_tokenizer, "float32", lora=True)
    assert worst <= 1e-5


def test_bf16_mismatch_clearly_exceeds_fp16(tiny_path, tiny_tokenizer):
    bf16_mean, _, bf16_roll = _mismatch(tiny_path, tiny_tokenizer, "bfloat16")
    fp16_mean, _, fp16_roll = _mismatch(tiny_path, tiny_tokenizer, "float16")
    assert bf16_roll.observed_dtype["compute_dtype"] == "bfloat16"
    assert fp16_roll.observed_dtype["compute_dtype"] == "float16"
    assert fp16_mean > 0  # sdpa: fp16 is close but not bitwise equal
    assert bf16_mean > 3 * fp16_mean, (bf16_mean, fp16_mean)


def test_generation_is_seeded_and_grouped(tiny_path, tiny_tokenizer):
    model = load_model(tiny_path)
    sampler = Sampler(model, torch.float32, tiny_tokenizer.pad_token_id, [tiny_tokenizer.eos_token_id])
    params = SamplingParams(max_new_tokens=16)
    prompts = _prompts(tiny_tokenizer, 2)
    a = sampler.generate(prompts, 3, params, seed=5)
    b = sampler.generate(prompts, 3, params, seed=5)
    c = sampler.generate(prompts, 3, params, seed=6)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.completion_ids.shape[0] == 6 and a.num_generations == 3 and len(a.prompt_ids) == 2
    assert not a.sampler_logprobs.requires_grad and (a.sampler_logprobs[a.completion_mask] <= 0).all()


def test_eos_stops_rows_and_sets_finish_reason(tiny_path, tiny_tokenizer):
    model = load_model(tiny_path)
    # Make EOS overwhelmingly likely after a few tokens by biasing the lm_head.
    with torch.no_grad():
        model.lm_head.weight[tiny_tokenizer.eos_token_id] *= 0  # tied: affects embeddings too; fine for a test
    sampler = Sampler(model, torch.float32, tiny_tokenizer.pad_token_id, [tiny_tokenizer.eos_token_id])
    out = sampler.generate(_prompts(tiny_tokenizer, 2), 4, SamplingParams(max_new_tokens=40), seed=0)
    lengths = out.completion_mask.sum(1)
    for row, reason in enumerate(out.finish_reasons):
        last = out.completion_ids[row, lengths[row] - 1].item()
        assert (reason == "eos") == (last == tiny_tokenizer.eos_token_id)
        assert reason == "eos" or lengths[row] == 40
        assert (out.completion_ids[row, lengths[row]:] == tiny_tokenizer.pad_token_id).all()


def test_processing_shapes_draw_not_logprobs(tiny_path, tiny_tokenizer):
    """top_k=1 makes sampling greedy while the recorded logprob stays the unprocessed one."""
    model = load_model(tiny_path)
    sampler = Sampler(model, torch.float32, tiny_tokenizer.pad_token_id, [])
    prompts = _prompts(tiny_tokenizer, 1)
    out = sampler.generate(prompts, 2, SamplingParams(max_new_tokens=6, top_k=1, top_p=0.5), seed=0)
    assert torch.equal(out.completion_ids[0], out.completion_ids[1])  # greedy: identical samples
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        first = torch.log_softmax(model(ids, attention_mask=mask).logits[0, -1].float(), -1)
    assert out.completion_ids[0, 0].item() == first.argmax().item()
    assert out.sampler_logprobs[0, 0].item() == pytest.approx(first.max().item(), abs=1e-5)
    assert out.sampler_logprobs[0, 0].item() < -1e-3  # not renormalised to 1 by top-k


def test_repetition_penalty_reduces_repeats(tiny_path, tiny_tokenizer):
    model = load_model(tiny_path)
    sampler = Sampler(model, torch.float32, tiny_tokenizer.pad_token_id, [])
    prompts = _prompts(tiny_tokenizer, 1)
    plain = sampler.generate(prompts, 8, SamplingParams(max_new_tokens=32, top_k=3), seed=1)
    penalised = sampler.generate(prompts, 8, SamplingParams(max_new_tokens=32, top_k=3, repetition_penalty=5.0), seed=1)

    def distinct(out):
        return sum(len(set(row.tolist())) for row in out.completion_ids) / out.completion_ids.numel()

    assert distinct(penalised) > distinct(plain)


def test_weight_sync_casts_trainable_weights(tiny_path, tiny_tokenizer):
    model = apply_lora(load_model(tiny_path), LoraSettings(r=4, alpha=8))
    sampler = Sampler(model, torch.float16, tiny_tokenizer.pad_token_id, [])
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param.add_(0.125)
    sampler.sync_from(dict(model.named_parameters()))
    synced = dict(sampler.model.named_parameters())[name]
    assert synced.dtype == torch.float16 and torch.equal(synced, param.half())


def test_invalid_sampling_params():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# --- paired randomness: a completion's draws depend on (seed, slot, generation, position) alone ---------


def _sampler(tiny_path, tokenizer, dtype=torch.float32, engine="auto", eos=None):
    eos = [tokenizer.eos_token_id] if eos is None else eos
    return Sampler(load_model(tiny_path), dtype, tokenizer.pad_token_id, eos, engine=engine)


def _rows(out, n):
    """Completion token lists grouped per prompt."""
    lists = out.completion_lists()
    return [lists[i * n:(i + 1) * n] for i in range(len(lists) // n)]


def test_removing_or_changing_a_prompt_leaves_other_completions_unchanged(tiny_path, tiny_tokenizer):
    sampler = _sampler(tiny_path, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=24)
    prompts = _prompts(tiny_tokenizer, 3)
    full = _rows(sampler.generate(prompts, 4, params, seed=11), 4)
    # Prompt 1 removed: prompts 0 and 2 keep their slots and so their random streams.
    without = _rows(sampler.generate([prompts[0], prompts[2]], 4, params, seed=11, slots=[0, 2]), 4)
    assert without == [full[0], full[2]]
    # Prompt 1 changed (longer: every other row gets more left padding).
    changed = _rows(sampler.generate([prompts[0], prompts[1] * 3, prompts[2]], 4, params, seed=11), 4)
    assert changed[0] == full[0] and changed[2] == full[2] and changed[1] != full[1]
    # The batch layout does not matter either: one prompt at a time gives the same completions.
    alone = [_rows(sampler.generate([p], 4, params, seed=11, slots=[i]), 4)[0] for i, p in enumerate(prompts)]
    assert alone == full


def test_rows_stopping_early_do_not_shift_other_rows_draws(tiny_path, tiny_tokenizer):
    """Make some rows stop early with an extra stop token: every other row is bitwise unchanged."""
    params = SamplingParams(max_new_tokens=24)
    prompts = _prompts(tiny_tokenizer, 2)
    free = _sampler(tiny_path, tiny_tokenizer, eos=[]).generate(prompts, 8, params, seed=3)
    free_rows = free.completion_lists()
    # A stop token that some completions contain, and not the first token of all of them.
    counts = torch.bincount(torch.tensor([t for row in free_rows for t in set(row)]))
    stop = int(torch.argmax((counts > 0) * (counts < len(free_rows)) * counts))
    stopped = _sampler(tiny_path, tiny_tokenizer, eos=[stop]).generate(prompts, 8, params, seed=3)
    stopped_rows = stopped.completion_lists()
    assert 0 < sum(stop in row for row in free_rows) < len(free_rows)
    for free_row, row in zip(free_rows, stopped_rows):
        cut = free_row.index(stop) + 1 if stop in free_row else len(free_row)
        assert row == free_row[:cut]
    # Their logprobs agree to fp32 rounding (rows leave the batch, so matmul shapes differ).
    unaffected = [i for i, row in enumerate(free_rows) if stop not in row]
    diff = (stopped.sampler_logprobs[unaffected, :24] - free.sampler_logprobs[unaffected, :24]).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_and_hf_engines_draw_the_same_tokens(tiny_path, tiny_tokenizer, dtype):
    params = SamplingParams(max_new_tokens=32, top_p=0.9)
    prompts = _prompts(tiny_tokenizer, 3)
    fast = _sampler(tiny_path, tiny_tokenizer, dtype, engine="fast").generate(prompts, 4, params, seed=5)
    hf = _sampler(tiny_path, tiny_tokenizer, dtype, engine="hf").generate(prompts, 4, params, seed=5)
    assert fast.completion_lists() == hf.completion_lists()
    assert fast.finish_reasons == hf.finish_reasons


def test_token_noise_is_exponential_and_the_race_draws_from_p():
    """The counter-based noise is Exp(1) and independent across tokens and positions, so
    argmax(p / E) is a draw from p: empirical frequencies match p (a chi-square bound that a fixed
    hash either meets or not; the numbers are identical on every machine)."""
    noise = TokenNoise(row_keys(seed=0, slots=range(64), num_generations=64), vocab_size=5)
    draws = torch.cat([noise.exponential(torch.arange(4096), position) for position in range(8)])
    assert draws.shape == (8 * 4096, 5) and (draws > 0).all() and torch.isfinite(draws).all()
    assert abs(draws.mean().item() - 1.0) < 0.01 and abs(draws.var().item() - 1.0) < 0.03
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    winners = (p / draws).argmax(dim=1)
    observed = torch.bincount(winners, minlength=5).double()
    expected = p.double() * winners.numel()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (observed, expected)  # 4 degrees of freedom: P(chi2 > 20.5) < 0.0005
    # Neighbouring positions and rows are uncorrelated.
    a, b = noise.exponential(torch.arange(4096), 0)[:, 0], noise.exponential(torch.arange(4096), 1)[:, 0]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_the_int32_hash_gives_the_bits_of_the_int64_one():
    """The noise hashes in int32 (wrapping products, masked shifts) for speed; every bit pattern it
    produces must be the uint32 hash's, so draws are those of earlier runs and of any device."""
    from fp16rl.rollout.noise import _as_int32, _mix32_int32, mix32

    edges = torch.tensor([0, 1, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**31 + 1, 0xFFFF0000, 2**32 - 1])
    x = torch.cat([edges, torch.randint(0, 2**32, (200_000,), generator=torch.Generator().manual_seed(0))])
    assert torch.equal(_mix32_int32(_as_int32(x)), _as_int32(mix32(x)))
    noise = TokenNoise(row_keys(seed=11, slots=range(3), num_generations=4), vocab_size=1000)
    rows, tokens = torch.arange(12), torch.randint(0, 1000, (12, 7), generator=torch.Generator().manual_seed(1))
    for position in (0, 1, 63, 10**6):
        expected = _noise_by_formula(noise.keys, 1000, position)
        assert torch.equal(noise.exponential(rows, position), expected)
        assert torch.equal(noise.exponential(rows, position, tokens), expected.gather(1, tokens))


def _noise_by_formula(keys: torch.Tensor, vocab: int, position: int) -> torch.Tensor:
    """``TokenNoise``'s numbers for every key's row at ``position``, by its formula in uint32 arithmetic."""
    from fp16rl.rollout.noise import _LOW32, exponential_from_bits, mix32

    base = mix32(keys ^ mix32((position * 0x85EBCA6B + 0x165667B1) & _LOW32))
    token_hash = mix32((torch.arange(vocab) * 0x9E3779B1 + 0x7F4A7C15) & _LOW32)
    return exponential_from_bits(mix32(base[:, None] ^ token_hash[None, :]) >> 8)


@pytest.mark.parametrize("block_bytes", [0, 64 * 2**10, 2**20])
def test_token_noise_blocks_give_the_formula_in_any_order(block_bytes):
    """``TokenNoise`` computes position hashes, and a small vocabulary's whole noise, for blocks of
    positions at once; asked in any order (forward across block ends, backward, far away), for all rows
    (None) or a subset, with or without candidate tokens, it gives the formula's numbers."""
    keys = row_keys(seed=5, slots=range(4), num_generations=3)
    noise = TokenNoise(keys, 300, block_bytes=block_bytes)
    assert (noise.vocab_positions > 1) == (block_bytes > 0)
    subset = torch.tensor([0, 4, 5, 11])
    tokens = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(2))
    for position in [*range(0, 140, 3), 7, 200, 63, 64, 65, 0, 10**6]:
        expected = _noise_by_formula(keys, 300, position)
        assert torch.equal(noise.exponential(None, position), expected)
        assert torch.equal(noise.exponential(subset, position), expected[subset])
        assert torch.equal(noise.exponential(subset, position, tokens), expected[subset].gather(1, tokens))


def test_behaviour_logprobs_are_the_processed_distribution_by_hand():
    """Top-p 0.8 on p = softmax([2, 1, 0, -1]) = [.644, .237, .087, .032]: the prefix reaching 0.8 is the
    first two tokens (0.644 < 0.8 <= 0.881), renormalised; the kept mass is their unprocessed sum."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    processed, _ = process_logits(logits, None, SamplingParams(max_new_tokens=1, top_p=0.8))
    p = torch.softmax(logits, -1)[0]
    kept = (p[0] + p[1]).item()
    assert torch.isinf(processed[0, 2:]).all() and torch.isfinite(processed[0, :2]).all()
    behaviour = torch.log_softmax(processed, -1)[0]
    assert behaviour[0].item() == pytest.approx(math.log(p[0].item() / kept), abs=1e-6)
    assert behaviour[1].item() == pytest.approx(math.log(p[1].item() / kept), abs=1e-6)
    plain = SamplingParams(max_new_tokens=1)
    assert process_logits(logits, None, plain) == (logits, None)  # nothing active: the same tensor, no copy


@pytest.mark.parametrize("params", [dict(top_p=0.8), dict(top_k=3), dict(top_p=0.9, top_k=5)], ids=str)
def test_behaviour_logprob_is_mu_minus_log_kept_mass(tiny_path, tiny_tokenizer, params):
    """Truncation renormalises: for every sampled token lmu_b = lmu - log(kept mass) (fp32), the kept mass
    is at most 1 (at least top_p under top-p), and without processing lmu_b == lmu and the mass is 1."""
    model = load_model(tiny_path)
    sampler = Sampler(model, torch.float32, tiny_tokenizer.pad_token_id, [tiny_tokenizer.eos_token_id])
    out = sampler.generate(_prompts(tiny_tokenizer), 4, SamplingParams(max_new_tokens=24, **params), seed=0)
    mask = out.completion_mask
    kept = out.kept_mass[mask]
    assert (kept <= 1 + 1e-6).all() and (kept < 1 - 1e-3).any()
    if "top_k" not in params:
        assert (kept >= params["top_p"] - 1e-5).all()
    expected = out.sampler_logprobs - torch.log(out.kept_mass)
    assert torch.allclose(out.behaviour_logprobs[mask], expected[mask], atol=1e-5)
    plain = sampler.generate(_prompts(tiny_tokenizer), 4, SamplingParams(max_new_tokens=24), seed=0)
    assert torch.equal(plain.behaviour_logprobs, plain.sampler_logprobs)
    assert (plain.kept_mass == 1).all()


def _full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering by sorting the whole vocabulary (the definition the candidates must reproduce)."""
    values, order = logits.softmax(-1).sort(dim=-1, descending=True)
    drop = torch.zeros_like(values, dtype=torch.bool).scatter(1, order, (values.cumsum(-1) - values) >= top_p)
    return logits.masked_fill(drop, float("-inf"))


@pytest.mark.parametrize("params", [dict(top_p=0.95), dict(top_p=0.5), dict(top_k=20), dict(top_k=200, top_p=0.9)],
                         ids=str)
def test_candidates_hold_every_kept_token_and_the_race_among_them_is_the_full_race(params):
    """Peaked rows (the nucleus within 64 or 1024 tokens) and flat ones (top-p sorts all 5000) in one
    batch: the filtered logits are the full sort's, every kept token is a candidate, and the race among
    candidates draws the token the race over the whole vocabulary draws, position after position."""
    generator = torch.Generator().manual_seed(0)
    vocab = 5000
    scale = torch.tensor([12.0, 8.0, 5.0, 2.0, 0.5, 0.1])[:, None]  # from peaked to nearly uniform
    logits = torch.randn(6, vocab, generator=generator) * scale
    sampling = SamplingParams(max_new_tokens=1, **params)
    processed, candidates = process_logits(logits, None, sampling)
    expected = logits
    if "top_k" in params:
        expected = expected.masked_fill(expected < torch.topk(expected, params["top_k"], dim=-1).values[:, -1:],
                                        float("-inf"))
    if "top_p" in params:
        expected = _full_sort_top_p(expected, params["top_p"])
    assert torch.equal(processed, expected)
    if candidates is None:  # top-p sorted the vocabulary for a flat row, with no top-k before it
        assert "top_k" not in params and bool((torch.isfinite(processed).sum(-1) > 64).any())
        processed, candidates = processed[:3], process_logits(logits[:3], None, sampling)[1]  # peaked rows
    kept = torch.isfinite(processed)
    covered = torch.zeros_like(kept).scatter(1, candidates, True)
    assert not (kept & ~covered).any()
    candidates = candidates.sort(dim=-1).values
    noise = TokenNoise(row_keys(seed=3, slots=range(6), num_generations=1), vocab)
    rows = torch.arange(len(processed))
    for position in range(50):
        full = draw_tokens(processed, noise.exponential(rows, position))
        among = draw_tokens(processed, noise.exponential(rows, position, candidates), candidates)
        assert torch.equal(full, among)


def test_tied_top_k_keeps_every_tie_and_gives_no_candidates():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    processed, candidates = process_logits(logits, None, SamplingParams(max_new_tokens=1, top_k=2))
    assert torch.isfinite(processed).tolist() == [[True, True, True, True, False]] and candidates is None


def test_exponential_noise_is_positive_at_the_top_bit_pattern():
    """The largest 24-bit pattern once gave u = 1 in fp32, E = -0 and a NaN in the race that drew a token
    top-p had removed; every E is now finite and > 0, and the race keeps to the processed support."""
    from fp16rl.rollout.noise import exponential_from_bits

    bits = torch.tensor([0, 1, 2**23, 2**24 - 2, 2**24 - 1], dtype=torch.int64)
    e = exponential_from_bits(bits)
    assert torch.isfinite(e).all() and (e > 0).all()
    assert e[-1].item() == pytest.approx(2**-24, rel=1e-3)  # -log(1 - 2^-24)
    processed = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    winner = draw_tokens(processed, e[None, [4, 4, 4]])
    assert winner.item() == 0
