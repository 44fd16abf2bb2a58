"""``--load-in-4bit`` (QLoRA): NF4 base shared by trainer and sampler, LoRA adapters trained.

The supported device is CUDA. CI has none, so the plumbing tests allow the CPU device and run
bitsandbytes' CPU implementation of the same NF4 format: everything of ours (loading, sharing the
quantised storage with the sampler, compute dtypes, training, checkpoints, dtype observation) runs
for real; only the matmul kernels differ from a GPU run.
"""

from __future__ import annotations

import importlib.util
import math

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
import yaml
from safetensors.torch import load_file
from bitsandbytes.nn import Linear4bit

from fp16rl.model import loading as models
from fp16rl.cli import app
from fp16rl.model.loading import ModelError, load_model, tiny_model_path
from fp16rl.rollout.sampler import Sampler
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer
from support import toy_config


@pytest.fixture
def cpu_4bit(monkeypatch):
    """Let 4-bit run on the CPU, in bitsandbytes' canonical weight layout.

    On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight in place the first time an eval-mode
    layer runs without grad, which the training-mode layer sharing that weight cannot then use;
    CUDA has no such repacking.
    """
    monkeypatch.setattr(models, "FOUR_BIT_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


def quantized_layers(model: torch.nn.Module) -> list[Linear4bit]:
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def test_4bit_is_refused_without_cuda(tmp_path):
    with pytest.raises(ModelError, match="--load-in-4bit needs a CUDA GPU .* device is cpu"):
        Trainer(toy_config(tmp_path / "run", lora_r=4, load_in_4bit=True))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_4bit_cli_refusal_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model-path", "tiny", "--dataset-path", "toy:digits",
                                      "--output-dir", str(out), "--lora-r", "4", "--load-in-4bit"])
    assert result.exit_code == 2
    assert "--load-in-4bit needs a CUDA GPU" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_4bit_without_bitsandbytes_names_the_package(cpu_4bit, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args))
    with pytest.raises(ModelError, match=r"needs the bitsandbytes package: pip install 'fp16rl\[quant\]'"):
        models.require_4bit_support(torch.device("cpu"))


def test_sampler_shares_quantized_storage_and_computes_in_its_dtype(cpu_4bit):
    trainer_model = load_model(tiny_model_path(), torch.float16, load_in_4bit=True)
    layers = quantized_layers(trainer_model)
    assert len(layers) == 14 and all(layer.weight.quant_type == "nf4" for layer in layers)
    assert trainer_model.lm_head.weight.dtype == torch.float16  # not quantised

    sampler = Sampler(trainer_model, torch.bfloat16, pad_token_id=0, eos_token_ids=[2])
    copies = quantized_layers(sampler.model)
    assert all(copy.weight is layer.weight for copy, layer in zip(copies, layers))  # one NF4 copy in memory
    assert {copy.compute_dtype for copy in copies} == {torch.bfloat16}
    assert {layer.compute_dtype for layer in layers} == {torch.float16}  # the trainer's are untouched
    assert sampler.model.lm_head.weight.dtype == torch.bfloat16


def test_4bit_lora_training_runs_and_engines_agree(cpu_4bit, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(toy_config(out, dtype="float16", lora_r=8, lora_alpha=16, load_in_4bit=True, max_steps=3,
                                 save_steps=2, learning_rate=1e-2))
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    last = trainer.train(show_progress=False)

    assert math.isfinite(last["optim/loss"]) and last["optim/step_skipped"] == 0.0
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(trained) == set(adapters_before) and all("lora_" in n for n in trained)
    assert all(not torch.equal(p, adapters_before[n]) for n, p in trained.items())
    # Same NF4 storage and dtype on both sides: only kernel shapes differ, so the mismatch stays at fp16 noise.
    assert last["mismatch/logp_abs_diff_mean"] < 5e-3
    for copy, layer in zip(quantized_layers(trainer.sampler.model), quantized_layers(trainer.model)):
        assert copy.weight is layer.weight and copy.compute_dtype == layer.compute_dtype == torch.float16

    document = yaml.safe_load((out / "config.yaml").read_text())
    assert document["config"]["load_in_4bit"] is True and "bitsandbytes" in document["versions"]
    precision = document["precision"]
    assert precision["engines_agree"] is True
    for side in ("sampler", "trainer"):
        assert precision["observed"][side]["compute_dtype"] == "float16"
        assert "nf4" in precision["observed"][side]["weight_dtypes"]
    # Checkpoints hold what was trained (fp32 adapters), not the quantised base.
    saved = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    assert set(saved) == set(adapters_before) and {t.dtype for t in saved.values()} == {torch.float32}


def test_4bit_resume_is_exact(cpu_4bit, tmp_path):
    def run(out, max_steps, resume=False):
        trainer = Trainer(toy_config(out, dtype="float16", lora_r=4, load_in_4bit=True, max_steps=max_steps,
                                     save_steps=2, resume=resume, save_samples_steps=100))
        trainer.train(show_progress=False)
        return read_metrics(out / "metrics.jsonl")

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 3, resume=True)
    keys = ["reward/mean", "optim/loss", "mismatch/logp_abs_diff_mean", "optim/grad_norm"]
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]


@pytest.mark.slow
def test_4bit_toy_reward_rises(cpu_4bit, tmp_path):
    """Learning is the subject, not precision: NF4 base with LoRA computing in fp32, whose kernels give
    the same numbers on every x86-64 CPU (bf16 kernels differ between AMX, AVX512-BF16 and neither)."""
    out = tmp_path / "fp32"
    Trainer(toy_config(out, dtype="float32", lora_r=8, lora_alpha=16, learning_rate=1e-2, load_in_4bit=True,
                       max_steps=25)).train(show_progress=False)
    rewards = [r["reward/mean"] for r in read_metrics(out / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.1 and last > first + 0.2, rewards


def test_4bit_fp16_mismatch_is_lower_than_bf16(cpu_4bit, tmp_path):
    """Precision is the subject: the same 3 steps in each dtype. bf16's 8-bit mantissa rounds ~8x
    coarser than fp16's 11 bits; measured ratios 3-4x, so 2x leaves margin on any CPU."""
    mismatch = {}
    for dtype in ("float16", "bfloat16"):
        out = tmp_path / dtype
        Trainer(toy_config(out, dtype=dtype, lora_r=8, lora_alpha=16, learning_rate=1e-2, load_in_4bit=True,
                           max_steps=3)).train(show_progress=False)
        records = read_metrics(out / "metrics.jsonl")
        mismatch[dtype] = sum(r["mismatch/logp_abs_diff_mean"] for r in records) / len(records)
    assert mismatch["bfloat16"] > 2 * mismatch["float16"], mismatch
