"""The fast Llama-family decoder reproduces the Hugging Face cache path: the same logits at every
step (left padding, prefix fan-out, rows leaving the batch, LoRA), the same sampled tokens through
the Sampler, and sampler logprobs equal to the trainer's full forward pass."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from fp16rl.fast_decode import LlamaFamilyDecoder, unsupported_reason
from fp16rl.logprobs import build_token_batch, completion_logprobs
from fp16rl.models import LoraSettings, TinyModelSpec, apply_lora, load_model, tiny_model_path
from fp16rl.sampler import HFCacheDecoder, Sampler, SamplingParams, cast_parameters, left_pad

PAD = 0
PADDED_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
EQUAL_PROMPTS = [[5, 6, 7, 8], [30, 31, 32, 33]]


def _model(arch: str, lora: bool = False, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny model; with ``lora``, adapters whose B is random so that they change the output."""
    model = load_model(tiny_model_path(TinyModelSpec(arch=arch)), attn_implementation=attn)
    if lora:
        model = apply_lora(model, LoraSettings(r=4, alpha=8))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@torch.inference_mode()
def _max_logit_diff(model: torch.nn.Module, prompts: list[list[int]], n: int = 3, steps: int = 12) -> float:
    """Drive both decoders with the same random tokens; rows leave the batch twice; worst |logit diff|."""
    input_ids, attention = left_pad(prompts, PAD)
    decoders = [HFCacheDecoder(model, steps), LlamaFamilyDecoder(model, steps)]
    hf, fast = (decoder.prefill(input_ids, attention) for decoder in decoders)
    worst = (hf.float() - fast.float()).abs().max().item()
    for decoder in decoders:
        decoder.repeat_interleave(n)
    rows = len(prompts) * n
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        tokens = torch.randint(1, 500, (rows,), generator=generator)
        if step in (3, 8):
            # First one row of every prompt leaves; then only the last prompt's rows stay (for
            # PADDED_PROMPTS the longest one, so the batch goes from padded to unpadded).
            keep = torch.arange(rows)[torch.arange(rows) % n != 1] if step == 3 else torch.arange(rows - 2, rows)
            rows, tokens = len(keep), tokens[keep]
            for decoder in decoders:
                decoder.select(keep)
        hf, fast = (decoder.step(tokens) for decoder in decoders)
        assert hf.shape == fast.shape == (rows, hf.shape[-1])
        worst = max(worst, (hf.float() - fast.float()).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "arch,lora,attn",
    [("llama", False, "sdpa"), ("llama", True, "sdpa"), ("qwen2", False, "sdpa"), ("qwen2", True, "sdpa"),
     ("llama", True, "eager")],
)
def test_fp32_logits_match_hf_decoder(arch, lora, attn):
    model = _model(arch, lora, attn)
    assert unsupported_reason(model) is None
    for prompts in (PADDED_PROMPTS, EQUAL_PROMPTS):  # masked SDPA path and mask-free path
        assert _max_logit_diff(model, prompts) <= 1e-5


def test_lora_adapters_apply_in_fast_path():
    base, adapted = _model("llama"), _model("llama", lora=True)
    input_ids, attention = left_pad(PADDED_PROMPTS, PAD)
    with torch.inference_mode():
        logits = []
        for model in (base, adapted):
            decoder = LlamaFamilyDecoder(model, 2)
            decoder.prefill(input_ids, attention)
            logits.append(decoder.step(torch.tensor([40, 41, 42])))
    assert (logits[0] - logits[1]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.0625), (torch.float16, 0.008)])
def test_half_precision_logits_within_rounding(dtype, tolerance):
    # Measured: bitwise equal (same kernels, same op order); tolerance = a few ulps at |logit| ~ 3.
    model = _model("qwen2", lora=True)
    cast_parameters(model, dtype)
    assert _max_logit_diff(model, PADDED_PROMPTS) <= tolerance


def test_supports_and_engine_choice():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    assert "GPT2LMHeadModel" in unsupported_reason(gpt2)
    windowed = MistralForCausalLM(
        MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    ).eval()
    assert "sliding" in unsupported_reason(windowed)
    assert unsupported_reason(_model("llama").train()) is not None
    assert unsupported_reason(_model("qwen2", lora=True)) is None

    assert Sampler(_model("llama", lora=True), torch.float32, PAD, [1]).engine == "fast"
    assert Sampler(_model("llama"), torch.float32, PAD, [1], engine="hf").engine == "hf"
    assert Sampler(gpt2, torch.float32, PAD, [1]).engine == "hf"
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Sampler(gpt2, torch.float32, PAD, [1], engine="fast")
    with pytest.raises(ValueError, match="unknown sampler engine"):
        Sampler(gpt2, torch.float32, PAD, [1], engine="vllm")


# One token in 16 ends a row, so rows finish at many different steps (select is exercised).
MANY_EOS = list(range(3, 512, 16))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_sampler_fast_equals_hf(arch):
    model = _model(arch, lora=True)
    params = SamplingParams(max_new_tokens=24)
    hf, fast = (
        Sampler(model, torch.float32, PAD, MANY_EOS, engine=engine).generate(PADDED_PROMPTS, 4, params, seed=3)
        for engine in ("hf", "fast")
    )
    assert len(set(fast.completion_mask.sum(1).tolist())) > 3 and "length" in fast.finish_reasons
    assert torch.equal(hf.completion_ids, fast.completion_ids)
    assert torch.equal(hf.completion_mask, fast.completion_mask)
    assert hf.finish_reasons == fast.finish_reasons
    assert (hf.sampler_logprobs - fast.sampler_logprobs).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_fast_sampler_logprobs_match_full_forward(arch):
    model = _model(arch, lora=True)
    sampler = Sampler(model, torch.float32, PAD, MANY_EOS, engine="fast")
    rollouts = sampler.generate(PADDED_PROMPTS, 4, SamplingParams(max_new_tokens=32), seed=0)
    batch = build_token_batch(rollouts.prompt_ids, 4, rollouts.completion_ids, rollouts.completion_mask, PAD)
    with torch.no_grad():
        trainer_logprobs, _ = completion_logprobs(model, batch)
    mask = rollouts.completion_mask
    assert mask.sum() > 100
    assert (trainer_logprobs - rollouts.sampler_logprobs)[mask].abs().max() <= 1e-5
