"""The fast Llama-family decoder reproduces the Hugging Face cache path: the same logits at every
step (left padding, prefix fan-out, rows leaving the batch, LoRA), the same sampled tokens through
the Sampler, and sampler logprobs equal to the trainer's full forward pass. Its opt-in shared prompt
KV cache gives the same logits up to rounding, the same completions, and holds one prompt copy."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from fp16rl.rollout.fast_decode import LlamaFamilyDecoder, unsupported_reason
from fp16rl.learner.logprobs import completion_logprobs
from fp16rl.model.forward import build_token_batch, causal_lm, left_pad
from fp16rl.model.loading import LoraSettings, TinyModelSpec, apply_lora, load_model, tiny_model_path
from fp16rl.rollout.hf_decoder import HFCacheDecoder
from fp16rl.rollout.sampler import Sampler, SamplingParams, cast_parameters

PAD = 0
PADDED_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
EQUAL_PROMPTS = [[5, 6, 7, 8], [30, 31, 32, 33]]


def _model(arch: str, lora: bool = False, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny model; with ``lora``, adapters whose B is random so that they change the output."""
    model = load_model(tiny_model_path(TinyModelSpec(arch=arch)), attn_implementation=attn)
    if lora:
        with torch.random.fork_rng():  # peft draws lora_A from the global generator: fixed, whatever ran before
            torch.manual_seed(0)
            model = apply_lora(model, LoraSettings(r=4, alpha=8))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@torch.inference_mode()
def _max_logit_diff(model: torch.nn.Module, prompts: list[list[int]], n: int = 3, steps: int = 12,
                    shared: bool = False) -> tuple[float, float]:
    """Drive two decoders with the same random tokens; rows leave the batch twice; (worst |logit diff|,
    largest |logit|). The pair: HF vs fast, or with ``shared`` fast vs fast with a shared prompt KV."""
    input_ids, attention = left_pad(prompts, PAD)
    if shared:
        decoders = [LlamaFamilyDecoder(model, steps), LlamaFamilyDecoder(model, steps, share_prompt_kv=True)]
    else:
        decoders = [HFCacheDecoder(model, steps), LlamaFamilyDecoder(model, steps)]
    hf, fast = (decoder.prefill(input_ids, attention) for decoder in decoders)
    worst, largest = (hf.float() - fast.float()).abs().max().item(), hf.float().abs().max().item()
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
        largest = max(largest, hf.float().abs().max().item())
    return worst, largest


@pytest.mark.parametrize(
    "arch,lora,attn",
    [("llama", False, "sdpa"), ("llama", True, "sdpa"), ("qwen2", False, "sdpa"), ("qwen2", True, "sdpa"),
     ("llama", True, "eager")],
)
def test_fp32_logits_match_hf_decoder(arch, lora, attn):
    model = _model(arch, lora, attn)
    assert unsupported_reason(model) is None
    for prompts in (PADDED_PROMPTS, EQUAL_PROMPTS):  # masked SDPA path and mask-free path
        assert _max_logit_diff(model, prompts)[0] <= 1e-5


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_types_match_hf_decoder(rope):
    """Static RoPE types come from a table computed once per call; dynamic RoPE, whose frequencies change
    once positions pass ``max_position_embeddings`` (16 here; this decode reaches 22), runs the model's
    rotary module at every step as transformers does. Both give the transformers path's logits."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=16,
                         rope_parameters={"rope_theta": 10000.0, **rope})
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    assert LlamaFamilyDecoder(model, 12).rope_table == (rope["rope_type"] != "dynamic")
    assert _max_logit_diff(model, PADDED_PROMPTS)[0] <= 1e-5


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
    assert _max_logit_diff(model, PADDED_PROMPTS)[0] <= tolerance


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


# --- the shared prompt KV cache (share_prompt_kv) ------------------------------------------------


def _mha_mistral() -> torch.nn.Module:
    """Mistral without GQA (kv heads = query heads) and without a sliding window."""
    config = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=None,
                           attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize(
    "arch,lora,attn",
    [("llama", False, "sdpa"), ("llama", True, "eager"), ("qwen2", True, "sdpa"), ("qwen2", False, "eager"),
     ("mistral-mha", False, "sdpa")],
)
def test_shared_prompt_kv_fp32_logits_match_unshared(arch, lora, attn):
    # Tiny llama/qwen2 have 4 query heads on 2 KV heads (GQA); the Mistral has none.
    model = _mha_mistral() if arch == "mistral-mha" else _model(arch, lora, attn)
    for prompts in (PADDED_PROMPTS, EQUAL_PROMPTS):
        assert _max_logit_diff(model, prompts, shared=True)[0] <= 1e-5


def _ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of ``dtype`` numbers at ``magnitude``."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_kv_half_precision_within_ulps(dtype, attn):
    # The shared formula rounds scores, weights and the two partial products to the dtype where the
    # default kernels accumulate in fp32. Measured (4 token seeds, llama and qwen2, both dtypes): 2-4
    # ulps of the largest logit, the size of the half path's own error against fp32 (3-5 ulps), so 8
    # leaves room for other kernels (AMX, AVX-512, AVX2). No LoRA here: its random B (std 0.3) raises
    # the model's gain and both errors with it (~20 ulps); the fp32 tests cover LoRA with the cache.
    model = _model("qwen2", attn=attn)
    cast_parameters(model, dtype)
    worst, largest = _max_logit_diff(model, PADDED_PROMPTS, shared=True)
    assert worst <= 8 * _ulp(dtype, largest), (worst, largest)


@torch.inference_mode()
def test_shared_prompt_kv_holds_one_copy_of_each_prompt():
    model = _model("qwen2")
    prompts, n, max_new = PADDED_PROMPTS, 4, 16
    input_ids, attention = left_pad(prompts, PAD)
    rows, width = len(prompts) * n, input_ids.shape[1]
    decoders = [LlamaFamilyDecoder(model, max_new, share_prompt_kv=share) for share in (False, True)]
    for decoder in decoders:
        decoder.prefill(input_ids, attention)
        decoder.repeat_interleave(n)
    unshared, shared = decoders
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert shared.shared.keys[0].shape == (len(prompts), kv_heads, width, head_dim)
    assert shared.keys[0].shape == (rows, kv_heads, max_new, head_dim)
    per_token = 2 * layers * kv_heads * head_dim * 4  # K and V, every layer, fp32
    assert shared.kv_bytes() == per_token * (len(prompts) * width + rows * max_new)
    assert unshared.kv_bytes() == per_token * rows * (width + max_new)
    assert shared.kv_bytes() < unshared.kv_bytes()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_sampler_shared_prompt_kv_equals_unshared(arch):
    model = _model(arch, lora=True)
    params = SamplingParams(max_new_tokens=24)
    unshared, shared = (
        Sampler(model, torch.float32, PAD, MANY_EOS, share_prompt_kv=share).generate(PADDED_PROMPTS, 4, params, seed=3)
        for share in (False, True)
    )
    assert len(set(shared.completion_mask.sum(1).tolist())) > 3 and "length" in shared.finish_reasons
    assert torch.equal(unshared.completion_ids, shared.completion_ids)
    assert torch.equal(unshared.completion_mask, shared.completion_mask)
    assert unshared.finish_reasons == shared.finish_reasons
    assert (unshared.sampler_logprobs - shared.sampler_logprobs).abs().max() <= 1e-5


def test_shared_prompt_kv_needs_the_fast_engine():
    with pytest.raises(ValueError, match="share_prompt_kv needs the fast sampler engine.*'hf' was asked for"):
        Sampler(_model("llama"), torch.float32, PAD, [1], engine="hf", share_prompt_kv=True)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    with pytest.raises(ValueError, match="share_prompt_kv needs the fast sampler engine.*GPT2LMHeadModel"):
        Sampler(gpt2, torch.float32, PAD, [1], share_prompt_kv=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_lora_projections_compute_what_peft_computes(dtype):
    """The decode loop's LoRA projections and MLP (``_lean``) skip peft's bookkeeping, not its maths:
    bitwise equal to the peft modules in every dtype; with the adapters disabled they defer to peft."""
    from fp16rl.rollout.fast_decode import _lean, _lean_mlp

    torch.manual_seed(0)
    model = _model("llama", lora=True).to(dtype)
    layer = causal_lm(model).model.layers[0]
    x = torch.randn(3, 1, layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    lean_q, lean_mlp = _lean(layer.self_attn.q_proj), _lean_mlp(layer.mlp)
    assert lean_q is not layer.self_attn.q_proj and lean_mlp is not layer.mlp  # the lean path is taken
    with torch.no_grad():
        assert torch.equal(lean_q(x), layer.self_attn.q_proj(x))
        assert torch.equal(lean_mlp(x), layer.mlp(x))
        with model.disable_adapter():
            assert torch.equal(lean_q(x), layer.self_attn.q_proj.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_plain_modules_compute_what_the_modules_compute(arch, dtype):
    """Without LoRA the decode loop calls the projections, SiLU and RMSNorms as functions (no
    ``nn.Module.__call__``): bitwise equal to the modules in every dtype; a module with a forward hook
    is called as a module, so the hook runs."""
    from fp16rl.rollout.fast_decode import _lean, _lean_mlp, _lean_norm

    model = _model(arch).to(dtype)
    body = causal_lm(model).model
    layer = body.layers[0]
    x = (torch.randn(3, 1, layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    lean = {"q_proj": (_lean(layer.self_attn.q_proj), layer.self_attn.q_proj),
            "mlp": (_lean_mlp(layer.mlp), layer.mlp), "input_norm": (_lean_norm(layer.input_layernorm), layer.input_layernorm),
            "final_norm": (_lean_norm(body.norm), body.norm)}
    with torch.no_grad():
        for name, (function, module) in lean.items():
            assert function is not module, name  # the lean path is taken
            assert torch.equal(function(x), module(x)), name
        ids = torch.tensor([[0], [5], [511]])
        assert torch.equal(_lean(body.embed_tokens)(ids), body.embed_tokens(ids))
    handle = layer.self_attn.q_proj.register_forward_hook(lambda *args: None)
    try:
        assert _lean(layer.self_attn.q_proj) is layer.self_attn.q_proj
    finally:
        handle.remove()


@pytest.mark.parametrize("width", [8, 65, 576, 4096])
def test_lean_fp32_norm_is_the_module_at_any_width(width):
    """In fp32 the lean RMSNorm is ``F.rms_norm`` (one call): bitwise the module's formula at widths that
    are and are not multiples of a vector register, rows of very different scales, and an eps that matters."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fp16rl.rollout.fast_decode import _lean_norm

    norm = LlamaRMSNorm(width, eps=1e-2)
    generator = torch.Generator().manual_seed(width)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=generator))
        x = torch.randn(5, 1, width, generator=generator) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 1e4])[:, None, None]
        assert torch.equal(_lean_norm(norm)(x), norm(x))
