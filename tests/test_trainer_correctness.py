"""Correctness of the trainer against what it claims: LR schedule, logit processing, stop tokens,
the reference model, the half-copy compute path, weight decay, resume checks, IS options."""

import logging
import math

import pytest
import torch

from fp16rl.core.errors import ConfigError, ModelError
from fp16rl.learner.logprobs import LogitHead, completion_logprobs
from fp16rl.model.forward import build_token_batch
from fp16rl.model.loading import TinyModelSpec, load_model, load_tokenizer, stop_token_ids, tiny_model_path
from fp16rl.rollout.sampler import Sampler, SamplingParams
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

from support import toy_config


def _lrs(run_dir):
    return [r["optim/lr"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_schedule_is_sized_in_optimizer_steps(tmp_path, kind):
    """num_iterations=2: 4 RL steps are 8 optimizer steps; the logged LR is the mean of the two used."""
    Trainer(toy_config(tmp_path / "run", max_steps=4, num_iterations=2, lr_scheduler_type=kind,
                       learning_rate=1e-3)).train(show_progress=False)
    lrs = _lrs(tmp_path / "run")
    if kind == "linear":  # lr(s) = lr0 * (8 - s) / 8 for optimizer step s = 0..7
        expected = [1e-3 * ((8 - 2 * k) + (8 - 2 * k - 1)) / 16 for k in range(4)]
    else:  # lr(s) = lr0 * 0.5 * (1 + cos(pi * s / 8))
        expected = [1e-3 * sum(0.5 * (1 + math.cos(math.pi * s / 8)) for s in (2 * k, 2 * k + 1)) / 2
                    for k in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))  # decays monotonically and never reaches 0 early


def test_skipped_fp16_step_does_not_advance_the_schedule(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", dtype="float16", max_steps=4, lr_scheduler_type="linear",
                                 learning_rate=1e-3))
    param = trainer.model.get_input_embeddings().weight
    handle = param.register_hook(lambda grad: grad * float("inf"))
    first = trainer.step(1)
    handle.remove()
    second = trainer.step(2)
    third = trainer.step(3)
    assert first["optim/step_skipped"] == 1.0 and second["optim/step_skipped"] == 0.0
    assert first["optim/lr"] == second["optim/lr"] == pytest.approx(1e-3)  # the skipped step used lr(0), so did step 2
    assert third["optim/lr"] == pytest.approx(1e-3 * 3 / 4)


@pytest.mark.parametrize("arch", ["gemma2", "granite", "cohere"])
def test_logit_post_processing_is_applied_by_the_trainer(fp16rl_home, arch):
    """Sampler (the model's own forward) and trainer (backbone + LogitHead) agree in fp32 to 1e-5."""
    path = tiny_model_path(TinyModelSpec(arch=arch))
    tokenizer = load_tokenizer(path)
    model = load_model(path, attn_implementation="eager" if arch == "gemma2" else "sdpa")  # Gemma2 has no sdpa
    sampler = Sampler(model, torch.float32, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    assert sampler.engine == "hf"
    prompts = [tokenizer(f"Count from {i}.")["input_ids"] for i in range(3)]
    out = sampler.generate(prompts, 4, SamplingParams(max_new_tokens=24), seed=0)
    batch = build_token_batch(out.prompt_ids, 4, out.completion_ids, out.completion_mask, tokenizer.pad_token_id)
    with torch.no_grad():
        trainer_lp, _ = completion_logprobs(model, batch)
        plain_lp, _ = completion_logprobs(model, batch, head=LogitHead(model.get_output_embeddings()))
    mask = out.completion_mask
    assert (trainer_lp - out.sampler_logprobs)[mask].abs().max() <= 1e-5
    assert (plain_lp - out.sampler_logprobs)[mask].abs().max() > 1e-2  # skipping the processing is visibly wrong
    assert LogitHead.of(model).verify(model) <= 1e-4


def test_unreproduced_logit_processing_is_refused(tiny_path):
    model = load_model(tiny_path)
    model.config.logits_scaling = 4.0  # a head that divides while the model's forward does not
    with pytest.raises(ModelError, match="post-processes its logits"):
        LogitHead.of(model).verify(model)


def test_stop_tokens_include_generation_config(tiny_path, tiny_tokenizer):
    model = load_model(tiny_path)
    model.generation_config.eos_token_id = [7, 9]  # Qwen2.5-Instruct lists <|im_end|> and <|endoftext|> here
    assert stop_token_ids(model, tiny_tokenizer) == sorted({7, 9, tiny_tokenizer.eos_token_id})


@pytest.mark.parametrize("compute", ["half_copy", "autocast"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_full_finetune_reference_starts_equal_to_the_policy(tmp_path, dtype, compute):
    trainer = Trainer(toy_config(tmp_path / "run", dtype=dtype, beta=0.05, max_steps=1, trainer_compute=compute))
    assert trainer.step(1)["policy/kl_ref"] == 0.0


def test_full_finetune_reference_stays_the_initial_policy(tmp_path):
    """The frozen copy computes with its own lm_head, not the policy's trained one (tied to the
    embeddings here): after training, its logprobs are the initial model's."""
    from fp16rl.model.forward import build_token_batch

    trainer = Trainer(toy_config(tmp_path / "run", beta=0.05, max_steps=2, learning_rate=5e-2))
    trainer.train(show_progress=False)
    initial = Trainer(toy_config(tmp_path / "initial", beta=0.05, max_steps=1))
    completions = torch.tensor([[5, 9, 11, 3], [7, 7, 2, 40]])
    tokens = build_token_batch([[1, 17, 23]], 2, completions, torch.ones_like(completions, dtype=torch.bool), 0)
    expected = initial.logprobs(initial.model, tokens)
    assert (trainer.logprobs(trainer.model, tokens) - expected).abs().max() > 1e-3  # the policy moved
    torch.testing.assert_close(trainer.reference.logprobs(trainer.logprobs, tokens), expected, rtol=0, atol=1e-6)


def test_half_copy_trainer_computes_what_the_sampler_computes(tmp_path):
    """Full fine-tuning fp16: half_copy has no fp32 residual stream and a smaller mismatch than autocast."""
    results = {}
    for compute in ("half_copy", "autocast"):
        trainer = Trainer(toy_config(tmp_path / compute, dtype="float16", max_steps=1, trainer_compute=compute))
        metrics = trainer.step(1)
        results[compute] = (metrics["mismatch/logp_abs_diff_mean"], trainer.precision_report)
    half, autocast = results["half_copy"], results["autocast"]
    assert half[1]["observed"]["trainer"]["residual_dtype"] == "float16" and half[1]["engines_agree"]
    assert autocast[1]["observed"]["trainer"]["residual_dtype"] == "float32" and not autocast[1]["engines_agree"]
    assert half[0] < autocast[0], (half[0], autocast[0])


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", weight_decay=0.1, max_steps=1))
    names = dict(zip(map(id, trainer.weights.masters), trainer.weights.names))
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in trainer.optimizer.param_groups}
    assert all("norm" in name for name in groups[0.0]) and groups[0.0]
    assert all("norm" not in name for name in groups[0.1])
    assert len(groups[0.0]) + len(groups[0.1]) == len(trainer.weights.names)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "granite", "cohere"])
def test_weight_decay_rule_is_hf_trainers(tmp_path, arch):
    """fp16rl's copy of HF Trainer's no-decay rule (imported Trainer costs every run seconds) gives the names
    Trainer's own method gives, with and without LoRA, on every tiny architecture (cohere: LayerNorm)."""
    from transformers import AutoModelForCausalLM
    from transformers import Trainer as HFTrainer

    from fp16rl.learner.weights import decay_parameter_names
    from fp16rl.model.loading import LoraSettings, apply_lora, write_tiny_model

    model = AutoModelForCausalLM.from_pretrained(write_tiny_model(tmp_path / arch, TinyModelSpec(arch=arch)))
    for candidate in (model, apply_lora(model, LoraSettings(r=4, alpha=8))):
        ours = decay_parameter_names(candidate)
        assert ours == HFTrainer.get_decay_parameter_names(None, candidate)
        assert 0 < len(ours) < len([name for name, _ in candidate.named_parameters()])  # norms left out


def test_grad_norm_covers_every_optimizer_step(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", num_iterations=3, max_steps=1))
    norms = []
    step = trainer._optimizer_step

    def recording_step():
        skipped, norm = step()
        norms.append(norm)
        return skipped, norm

    trainer._optimizer_step = recording_step
    metrics = trainer.step(1)
    assert len(norms) == 3 and len(set(norms)) == 3
    assert metrics["optim/grad_norm"] == pytest.approx(sum(norms) / 3)
    assert metrics["optim/grad_norm_max"] == max(norms)


def test_sequence_level_is_with_token_sum_loss_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        trainer = Trainer(toy_config(tmp_path / "run", importance_sampling_level="sequence", loss_type="bnpo",
                                     max_steps=2))
        trainer.train(show_progress=False)
    assert sum("GSPO uses --loss-type grpo" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        Trainer(toy_config(tmp_path / "run2", importance_sampling_level="sequence", loss_type="grpo", max_steps=1))
    assert not any("GSPO" in r.getMessage() for r in caplog.records)


def test_empty_loss_step_warns_counts_and_changes_nothing(tmp_path, caplog):
    """Every completion truncated and masked: the step trains on no token."""
    trainer = Trainer(toy_config(tmp_path / "run", max_completion_length=2, mask_truncated_completions=True,
                                 max_steps=2, weight_decay=0.1))
    before = [m.detach().clone() for m in trainer.weights.masters]
    with caplog.at_level(logging.WARNING, logger="fp16rl"):
        first = trainer.step(1)
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.weights.masters))  # no decay, no momentum
        second = trainer.step(2)
    assert first["completion/truncated_ratio"] == 1.0 and first["optim/loss_tokens"] == 0.0
    assert first["optim/empty_loss_steps_total"] == 1.0
    assert second["optim/empty_loss_steps_total"] == 1.0 + (second["optim/loss_tokens"] == 0.0)
    assert sum("no completion token is in the loss" in r.getMessage() for r in caplog.records) == 1


def test_resume_with_another_dtype_is_refused(tmp_path):
    Trainer(toy_config(tmp_path / "run", dtype="bfloat16", max_steps=1)).train(show_progress=False)
    with pytest.raises(ConfigError, match="started with dtype=bfloat16.*--dtype float16"):
        Trainer(toy_config(tmp_path / "run", dtype="float16", max_steps=2, resume=True))
    # Another spelling of the same dtype is the same dtype.
    Trainer(toy_config(tmp_path / "run", dtype="bf16", max_steps=2, resume=True)).train(show_progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_threads_option_sets_the_pool_and_auto_never_raises_it(tmp_path):
    """--threads N sets torch's CPU pool (recorded in config.yaml); auto keeps at most the current count."""
    import yaml

    from fp16rl.model.hardware import auto_threads

    before = torch.get_num_threads()
    try:
        trainer = Trainer(toy_config(tmp_path / "two", threads=2, max_steps=1))
        assert torch.get_num_threads() == 2
        assert yaml.safe_load((trainer.run_dir / "config.yaml").read_text())["cpu_threads"] == 2
        torch.set_num_threads(1)
        assert auto_threads(torch.device("cpu")) == 1
        Trainer(toy_config(tmp_path / "auto", max_steps=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        toy_config(tmp_path / "bad", threads=-1).validate()


def test_keep_freed_memory_applies_with_glibc_unless_the_user_chose(monkeypatch):
    """On Linux/glibc the allocator is told to keep freed memory (no mmap/munmap per large tensor);
    a user's own MALLOC_* setting stands. The setting does not change what is computed."""
    import platform

    from fp16rl.model.hardware import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    big = torch.ones(64, 1 << 20)  # 256 MB: served by the heap now, and still correct
    assert big.sum().item() == 64 * (1 << 20)
