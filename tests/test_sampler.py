"""The sampler: logprobs equal the trainer's in fp32, the bf16 mismatch is clearly larger than fp16,
sampling is seeded, and processing (top-p/top-k/penalty) shapes the draw but not the logprobs."""

import pytest
import torch

from fp16rl.logprobs import build_token_batch, completion_logprobs
from fp16rl.models import LoraSettings, apply_lora, load_model
from fp16rl.precision import PrecisionPolicy
from fp16rl.sampler import Sampler, SamplingParams, left_pad


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
    assert a.completion_ids.shape[0] == 6 and a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
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
    sampler.sync_from(model)
    synced = dict(sampler.model.named_parameters())[name]
    assert synced.dtype == torch.float16 and torch.equal(synced, param.half())


def test_invalid_sampling_params():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
