"""The trainer's forward with each prompt computed once (``prompt_forward``): the same logprobs and
gradients as the plain forward, fewer tokens through the decoder layers, and a refusal for models
whose attention does not take a prefix cache."""

import pytest
import torch

from fp16rl.learner import prompt_forward
from fp16rl.learner.logprobs import completion_logprobs
from fp16rl.model.forward import backbone, build_token_batch, length_dependent_rope
from fp16rl.model.loading import TinyModelSpec, enable_gradient_checkpointing, load_model, tiny_model_path
from fp16rl.training.trainer import Trainer

from support import toy_config

# Shared and plain forwards are the same sums in a different order (other matmul shapes): fp32 rounding,
# ~1e-6 measured on the tiny model; 1e-5 leaves a 10x margin and is far below any real error (a wrong
# mask or position changes logprobs by > 1e-2).
FP32_TOLERANCE = 1e-5


def _batch(vocab: int, generations: int = 4, width: int = 12, prompts: int = 2):
    """Two prompts of different lengths (left padding; or the first alone), ``generations`` completions
    each, of varied lengths."""
    prompt_ids = [[(7 * k + 3) % vocab for k in range(1, 15)], [(11 * k + 5) % vocab for k in range(1, 7)]][:prompts]
    draw = torch.Generator().manual_seed(1)
    completions = torch.randint(1, vocab, (prompts * generations, width), generator=draw)
    mask = torch.ones_like(completions, dtype=torch.bool)
    for row in range(mask.shape[0]):
        mask[row, width - (row * 5) % width:] = False
    return build_token_batch(prompt_ids, generations, completions, mask, pad_token_id=0)


def _logprobs_and_grads(arch: str, lora: bool, checkpointing: bool, share: bool | None, prompts: int = 2):
    model = load_model(tiny_model_path(TinyModelSpec(arch=arch)))
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # init_lora_weights=False: random B, so the adapters change the output
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 init_lora_weights=False))
    enable_gradient_checkpointing(model, checkpointing)
    batch = _batch(model.config.vocab_size, prompts=prompts)
    if share is None:  # the reference: the model's own forward over every padded row, whole width
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.float()
        start = batch.prompt_width - 1
        logp = torch.log_softmax(logits[:, start: start + batch.completion_ids.shape[1]], dim=-1)
        logprobs = logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask
    else:
        logprobs, _ = completion_logprobs(model, batch, share_prompts=share)
    weights = torch.linspace(-1.0, 2.0, logprobs.shape[1])  # a loss that weighs every position differently
    (logprobs * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), grads


@pytest.mark.parametrize("arch,lora,checkpointing,prompts", [
    ("llama", False, False, 2), ("llama", True, False, 2), ("llama", False, True, 2), ("qwen2", True, True, 2),
    ("granite", False, False, 2), ("llama", False, False, 1), ("llama", True, True, 1)])
def test_shared_prompt_forward_gives_the_plain_logprobs_and_gradients(fp16rl_home, arch, lora, checkpointing,
                                                                      prompts):
    """fp32: every completion logprob and every parameter's gradient (prompt-side ones included: they
    reach the prompt only through the gathered or broadcast keys/values) equal those of the model's own
    forward over the whole padded batch, to rounding: the trainer's plain forward (rows in length
    buckets) and its shared-prompt forward; one prompt (broadcast) or two of different lengths
    (gathered, left padding)."""
    reference_lp, reference_grads = _logprobs_and_grads(arch, lora, False, share=None, prompts=prompts)
    for share in (False, True):
        lp, grads = _logprobs_and_grads(arch, lora, checkpointing, share=share, prompts=prompts)
        assert (lp - reference_lp).abs().max().item() <= FP32_TOLERANCE
        assert grads.keys() == reference_grads.keys() and grads
        for name, grad in reference_grads.items():
            scale = grad.abs().max().clamp(min=1e-3)
            assert ((grads[name] - grad).abs().max() / scale).item() <= FP32_TOLERANCE, (share, name)


def test_the_decoder_layers_see_each_prompt_once_and_no_padding_beyond_each_bucket(fp16rl_home):
    """Tokens through the first decoder layer: plain, N x (P + C) in one forward; shared, U x P for the
    prompts plus each length bucket's rows x its longest completion; rows of different prompts with
    nothing to share, each row's prompt plus its bucket's width."""
    model = load_model(tiny_model_path())
    batch = _batch(model.config.vocab_size, generations=4)
    seen = []
    handle = backbone(model).layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    lengths = batch.completion_mask.sum(-1)
    prompt, rows = batch.prompt_width, lengths.shape[0]
    with torch.no_grad():
        completion_logprobs(model, batch)
        assert seen == [(rows, batch.input_ids.shape[1])]
        seen.clear()
        completion_logprobs(model, batch, share_prompts=True)
        buckets = prompt_forward.length_buckets(lengths, 0)
        assert seen[0] == (2, prompt)  # the two distinct prompts, once each
        assert seen[1:] == [(len(b), int(lengths[b].max())) for b in buckets]
        assert len(buckets) > 1 and sorted(torch.cat(buckets).tolist()) == list(range(rows))
        shared = sum(r * w for r, w in seen)
        assert shared < rows * batch.input_ids.shape[1] / 2
        seen.clear()
        unshared = batch.select(torch.tensor([3, 4]))  # the last row of prompt 0, the first of prompt 1
        completion_logprobs(model, unshared, share_prompts=True)
        widths = unshared.completion_mask.sum(-1)
        assert seen == [(len(b), prompt + int(widths[b].max())) for b in prompt_forward.length_buckets(widths, prompt)]
    handle.remove()


def test_uniform_forward_calls_the_stack_twice_whatever_the_rows(fp16rl_home):
    """FSDP's form (``uniform``): every rank must call each layer the same number of times, so the
    shared forward makes one prompt pass and one completion pass over every row, whether its rows share
    prompts or not and however their lengths differ; the hidden states are the plain forward's."""
    model = load_model(tiny_model_path())
    decoder = backbone(model)
    batch = _batch(model.config.vocab_size, generations=4)
    seen = []
    handle = decoder.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    prompt = batch.prompt_width
    with torch.no_grad():
        for rows, prompts in ((torch.arange(8), 2), (torch.tensor([3, 4]), 2), (torch.tensor([5]), 1)):
            part = batch.select(rows)
            seen.clear()
            shared = prompt_forward.completion_hidden(decoder, part, share_prompts=True, uniform=True)
            assert seen == [(prompts, prompt), (len(rows), int(part.completion_mask.sum(-1).max()))]
            plain = prompt_forward.completion_hidden(decoder, part)
            mask = part.completion_mask
            assert (shared[mask] - plain[mask]).abs().max().item() <= FP32_TOLERANCE * plain[mask].abs().max().item()
    handle.remove()


def test_length_buckets_minimise_the_tokens_computed():
    """The DP's split equals the best of every split of the sorted rows into runs (brute force)."""
    import itertools

    draw = torch.Generator().manual_seed(3)
    for trial in range(40):
        lengths = torch.randint(1, 65, (int(torch.randint(1, 8, (1,), generator=draw)),), generator=draw)
        fixed = [0, 40][trial % 2]
        ordered = sorted(lengths.tolist(), reverse=True)
        count = len(ordered)
        per_forward = count * (fixed + ordered[0]) / 16

        def cost(cuts):
            bounds = [0, *cuts, count]
            return sum((b - a) * (fixed + ordered[a]) + per_forward for a, b in zip(bounds, bounds[1:]))

        best = min(cost(c) for k in range(count) for c in itertools.combinations(range(1, count), k))
        buckets = prompt_forward.length_buckets(lengths, fixed)
        got = sum(len(b) * (fixed + int(lengths[b].max())) + per_forward for b in buckets)
        assert got == pytest.approx(best)
        assert sorted(torch.cat(buckets).tolist()) == list(range(count))
    assert len(prompt_forward.length_buckets(torch.tensor([12] * 8), 0)) == 1  # equal lengths: one forward
    assert [b.tolist() for b in prompt_forward.length_buckets(torch.tensor([3, 64, 3, 3, 3]), 0)] == [[1], [0, 2, 3, 4]]


def test_prompt_owners_groups_adjacent_rows_with_one_prompt(fp16rl_home):
    batch = _batch(512, generations=3)
    assert prompt_forward.prompt_owners(batch).tolist() == [0, 0, 0, 1, 1, 1]
    assert prompt_forward.prompt_owners(batch.select(slice(2, 4))) is None  # no two rows share a prompt
    assert prompt_forward.prompt_owners(batch.select(slice(1, 4))).tolist() == [0, 0, 1]


def test_one_prompt_is_broadcast_to_its_rows_not_copied():
    keys = torch.randn(1, 2, 5, 4)
    rows = prompt_forward._to_rows(keys, torch.zeros(8, dtype=torch.long))
    assert rows.shape == (8, 2, 5, 4) and rows.data_ptr() == keys.data_ptr() and rows.stride(0) == 0
    two = torch.randn(2, 2, 5, 4)
    assert torch.equal(prompt_forward._to_rows(two, torch.tensor([0, 0, 1])), two[[0, 0, 1]])


def test_models_whose_attention_is_not_full_run_the_plain_forward(fp16rl_home):
    """Gemma2 (sliding window, alternating layer types) is refused with its reason; full-attention
    models pass the probe check in fp32 and under half-precision autocast."""
    gemma = load_model(tiny_model_path(TinyModelSpec(arch="gemma2")), attn_implementation="eager")
    assert "sliding-window" in prompt_forward.check(backbone(gemma))
    for arch in ("llama", "qwen2", "granite", "cohere"):
        decoder = backbone(load_model(tiny_model_path(TinyModelSpec(arch=arch))))
        assert prompt_forward.check(decoder) is None, arch
        for dtype in (torch.bfloat16, torch.float16):
            assert prompt_forward.check(decoder, lambda: torch.autocast("cpu", dtype=dtype)) is None, (arch, dtype)


def test_a_model_with_dropout_runs_the_plain_forward(fp16rl_home):
    model = load_model(tiny_model_path())
    model.config.attention_dropout = 0.1
    for layer in backbone(model).layers:
        layer.self_attn.attention_dropout = 0.1
        layer.mlp.add_module("dropout", torch.nn.Dropout(0.1))
    model.train()
    assert "dropout" in prompt_forward.check(backbone(model))


@pytest.mark.parametrize("lora_r", [0, 8])
def test_training_with_and_without_prompt_sharing_matches(tmp_path, lora_r):
    """Two fp32 GRPO steps (pi_old recomputed at step 1, from the training forward at step 2), with and
    without sharing: the same completions, rewards, logprobs, loss and gradient norm to rounding."""
    runs = {}
    for share in (True, False):
        trainer = Trainer(toy_config(tmp_path / f"run-{share}", max_steps=2, lora_r=lora_r, learning_rate=1e-2,
                                     beta=0.01, share_prompt_forward=share))
        assert trainer.share_prompts is share
        runs[share] = [trainer.step(step) for step in (1, 2)]
    for shared, plain in zip(runs[True], runs[False]):
        assert shared["completion/length_mean"] == plain["completion/length_mean"]
        assert shared["reward/mean"] == plain["reward/mean"]
        for key in ("mismatch/logp_abs_diff_mean", "policy/kl_ref", "optim/loss", "optim/grad_norm"):
            assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


def test_logits_chunks_are_recomputed_only_when_there_are_several(fp16rl_home):
    """One chunk: the head runs once (its recompute would keep as much, at the same moment); several:
    each chunk again in backward. The logprobs and gradients are the same either way."""
    model = load_model(tiny_model_path())
    batch = _batch(model.config.vocab_size)
    tokens = int(batch.completion_mask.sum())
    results = {}
    for chunk in (tokens, 16):
        calls = []
        handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(1))
        model.zero_grad()
        logprobs, _ = completion_logprobs(model, batch, chunk_tokens=chunk)
        logprobs.sum().backward()
        handle.remove()
        chunks = -(-tokens // chunk)
        assert len(calls) == (1 if chunks == 1 else 2 * chunks)
        results[chunk] = logprobs.detach(), model.get_output_embeddings().weight.grad.clone()
    (one_lp, one_grad), (many_lp, many_grad) = results.values()
    assert (one_lp - many_lp).abs().max().item() <= FP32_TOLERANCE
    assert ((one_grad - many_grad).abs().max() / one_grad.abs().max()).item() <= FP32_TOLERANCE


# Tiny llamas whose RoPE frequencies follow the longest position of a forward, with the switch inside
# ``_batch``'s 26 positions (prompt 14): dynamic NTK past 16 positions, longrope's long factors past 16 of 64.
LENGTH_DEPENDENT_ROPE = {"dynamic": TinyModelSpec(rope="dynamic", max_position_embeddings=16),
                         "longrope": TinyModelSpec(rope="longrope", max_position_embeddings=64)}


@pytest.mark.parametrize("rope", sorted(LENGTH_DEPENDENT_ROPE))
def test_length_dependent_rope_runs_the_plain_forward_and_is_announced(tmp_path, caplog, rope):
    """A prompt pass alone would take its frequencies from the prompt's positions, not the whole row's (max
    |dlogp| 0.2 dynamic, 0.9 longrope on these models): such a model is refused the shared forward with its
    reason, the trainer's logprobs are the plain forward's in fp32, and the start-up says (and summary.json
    records) that the sampler/trainer mismatch includes the RoPE-scaling difference."""
    path = tiny_model_path(LENGTH_DEPENDENT_ROPE[rope])
    decoder = backbone(load_model(path))
    assert f"rope_type {rope}" in prompt_forward.check(decoder)
    assert length_dependent_rope(load_model(tiny_model_path()).config) is None
    caplog.set_level("WARNING", logger="fp16rl")
    trainer = Trainer(toy_config(tmp_path / "run", model_path=str(path), max_steps=1, share_prompt_forward=True))
    assert trainer.share_prompts is False
    batch = _batch(trainer.model.config.vocab_size)
    with torch.no_grad():
        plain, _ = completion_logprobs(trainer.model, batch)
        assert (trainer.logprobs(trainer.model, batch) - plain).abs().max().item() <= FP32_TOLERANCE
    warnings = [r.getMessage() for r in caplog.records if "RoPE-scaling difference" in r.getMessage()]
    assert len(warnings) == 1 and f"rope_type {rope}" in warnings[0]
    trainer.train(show_progress=False)
    import json

    assert json.loads((tmp_path / "run" / "summary.json").read_text())["mismatch_includes_rope_scaling"] is True


@pytest.mark.parametrize("rope", sorted(LENGTH_DEPENDENT_ROPE))
def test_the_probe_reaches_past_the_rope_scaling_limit(fp16rl_home, monkeypatch, rope):
    """A length-dependent RoPE the type names miss is still caught: the probe moves its rows to positions
    whose prompt pass ends below the scaling limit and whose completions pass it (the short probe alone,
    9 positions, sees no difference)."""
    decoder = backbone(load_model(tiny_model_path(LENGTH_DEPENDENT_ROPE[rope])))
    monkeypatch.setattr(prompt_forward, "length_dependent_rope", lambda config: None)
    assert "differs from the plain one" in prompt_forward.check(decoder)
