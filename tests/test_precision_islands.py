"""FP32 islands (``--fp32-modules``): the chosen modules are FP32 in both engines, the rest is not, the
precision check records them, and the probe measures a run with and without them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fp16rl.cli import app
from fp16rl.config.options import TrainConfig
from fp16rl.core.errors import ConfigError, ModelError, PrecisionError
from fp16rl.learner.logprobs import LogitHead
from fp16rl.learner.weights import MasterWeights
from fp16rl.measure.rollouts import RolloutRequest, TrainerForward, measure_rollouts
from fp16rl.model.forward import causal_lm
from fp16rl.model.islands import island_modules, resolve_islands
from fp16rl.model.loading import LoraSettings, load_model, load_trainer_model, stop_token_ids
from fp16rl.model.precision import PrecisionPolicy, check_observed
from fp16rl.rollout.sampler import Sampler, SamplingParams


def _engines(tiny_path, tokenizer, modules, lora=None, engine="auto"):
    policy = PrecisionPolicy.from_options("float16", fp32_modules=modules)
    model = load_trainer_model(tiny_path, policy.trainer_dtype, lora, fp32_modules=policy.fp32_modules).eval()
    weights = MasterWeights(model, policy)
    sampler = Sampler(model, policy.sampler_dtype, tokenizer.pad_token_id, stop_token_ids(model, tokenizer),
                      engine=engine)
    sampler.sync_from(weights.named_masters())
    request = RolloutRequest([[5, 6, 7, 8], [9, 10]], 2, SamplingParams(max_new_tokens=6), 0, [0, 1])
    measured = measure_rollouts(sampler, request, TrainerForward(model, LogitHead.of(model), policy, 1.0, 4, 2048),
                                tokenizer.pad_token_id)
    return policy, model, sampler, measured


def _dtypes(model):
    """Parameter name (relative to the causal LM) -> dtype."""
    return {name: p.dtype for name, p in causal_lm(model).named_parameters()}


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_norm_islands_are_fp32_in_both_engines_and_recorded(tiny_path, tiny_tokenizer, engine):
    policy, model, sampler, measured = _engines(tiny_path, tiny_tokenizer, ["norms"], engine=engine)
    for engine_model in (model, sampler.model):
        for name, dtype in _dtypes(engine_model).items():
            assert dtype == (torch.float32 if "norm" in name else torch.float16), (name, dtype)
    sampler_report, trainer_report = measured.observed["sampler"], measured.observed["trainer"]
    for report in (sampler_report, trainer_report):
        assert report["island_dtype"] == "float32" and report["island_weight_dtypes"] == "float32"
        assert report["compute_dtype"] == "float16" and report["logits_dtype"] == "float16"
        assert report["island_modules"] == ("model.layers.*.input_layernorm x2, "
                                            "model.layers.*.post_attention_layernorm x2, model.norm")
    precision = check_observed(policy, sampler_report, trainer_report)
    assert precision["declared"]["fp32_modules"] == ["norms"]
    assert precision["fp32_islands"]["sampler"] == precision["fp32_islands"]["trainer"] == "float32"
    assert measured.old_logprobs.isfinite().all() and measured.rollouts.sampler_logprobs.isfinite().all()


def test_head_island_keeps_fp32_logits_and_its_tied_embedding(tiny_path, tiny_tokenizer):
    policy, model, sampler, measured = _engines(tiny_path, tiny_tokenizer, ["head"])
    for engine_model in (model, sampler.model):
        assert sorted(island_modules(engine_model)) == ["lm_head", "model.embed_tokens"]  # tied weights
        dtypes = _dtypes(engine_model)
        assert dtypes["model.embed_tokens.weight"] == torch.float32
        assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.float16
    for report in measured.observed.values():
        assert report["logits_dtype"] == "float32" and report["compute_dtype"] == "float16"
        assert report["residual_dtype"] in ("float16", "unobserved")  # the embedding's output is rounded back
    check_observed(policy, measured.observed["sampler"], measured.observed["trainer"])


def test_layer_pattern_with_lora_marks_its_units(tiny_path, tiny_tokenizer):
    policy, model, sampler, measured = _engines(tiny_path, tiny_tokenizer, ["model.layers.1"], lora=LoraSettings())
    islands = sorted(island_modules(model))
    assert "model.layers.1.self_attn.o_proj" in islands and "model.layers.1.input_layernorm" in islands
    assert not any(name.startswith("model.layers.0") for name in islands)
    assert sorted(island_modules(sampler.model)) == islands
    for name, dtype in _dtypes(sampler.model).items():
        assert dtype == (torch.float32 if name.startswith("model.layers.1.") else torch.float16), name
    report = check_observed(policy, measured.observed["sampler"], measured.observed["trainer"], full_finetune=False)
    assert report["fp32_islands"]["trainer"] == "float32"


def test_check_observed_refuses_islands_that_are_not_declared_or_missing():
    observed = {"compute_dtype": "float16", "residual_dtype": "float16", "logits_dtype": "float16",
                "island_dtype": "float32", "island_weight_dtypes": "float32", "island_modules": "model.norm",
                "island_head": "false"}
    plain = {k: v for k, v in observed.items() if not k.startswith("island")}
    with pytest.raises(PrecisionError, match="undeclared fp32 islands"):
        check_observed(PrecisionPolicy.from_options("fp16"), observed, observed)
    declared = PrecisionPolicy.from_options("fp16", fp32_modules=["norms"])
    with pytest.raises(PrecisionError, match="sampler holds none of the declared fp32 islands"):
        check_observed(declared, plain, observed)
    with pytest.raises(PrecisionError, match="computed in float16"):
        check_observed(declared, observed, {**observed, "island_dtype": "float16"})
    assert "fp32_islands" not in check_observed(PrecisionPolicy.from_options("fp16"), plain, plain)


def test_patterns_resolve_to_units_and_unknown_ones_fail(tiny_path):
    model = load_model(tiny_path)
    assert resolve_islands(model, ["*.mlp.down_proj"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.0.mlp.gate_proj" in resolve_islands(model, ["model.layers.0.mlp"])
    with pytest.raises(ModelError, match="--fp32-modules model.nothing: matches no module"):
        resolve_islands(model, ["model.nothing"])


@pytest.mark.parametrize("options, message", [
    ({"fp32_modules": ["flagged"]}, "flagged needs the fp16 range check"),
    ({"fp32_modules": ["norms"], "trainer_compute": "autocast", "lora_r": 0}, "--trainer-compute autocast"),
    ({"fp32_modules": ["bad name!"]}, "--fp32-modules 'bad name!'"),
])
def test_train_option_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_training_records_islands_in_config_yaml(tmp_path):
    from support import toy_config
    from fp16rl.training.trainer import Trainer

    Trainer(toy_config(tmp_path / "run", max_steps=1, fp32_modules=["norms"])).train(show_progress=False)
    precision = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"]
    assert precision["declared"]["fp32_modules"] == ["norms"]
    assert precision["fp32_islands"] == {"requested": ["norms"], "modules": precision["observed"]["trainer"]["island_modules"],
                                         "sampler": "float32", "trainer": "float32"}


def test_probe_with_and_without_norm_islands(tmp_path, tiny_path):
    """The probe measures both; the islands are in probe.json and change the numbers (other rounding). The
    head is among them: the random tiny model's norm weights are 1, and an RMSNorm whose weight is 1 rounds
    once to fp16 in either precision, so norms alone would give the same numbers bitwise."""
    docs = {}
    for label, extra in (("plain", []), ("norms", ["--fp32-modules", "norms,head"])):
        out = tmp_path / label
        result = CliRunner().invoke(app, ["probe", "--model-path", "tiny", "--dtypes", "fp16", "--batch-sizes", "2",
                                          "--num-samples", "4", "--max-new-tokens", "10", *extra,
                                          "--output-dir", str(out)])
        assert result.exit_code == 0, result.output
        docs[label] = json.loads((out / "probe.json").read_text())
    plain, norms = (docs[k]["configs"][0] for k in ("plain", "norms"))
    assert "island_dtype" not in plain["observed"]["sampler"]
    assert norms["observed"]["sampler"]["island_dtype"] == norms["observed"]["trainer"]["island_dtype"] == "float32"
    assert docs["norms"]["settings"]["fp32_modules"] == ["norms", "head"]
    for config in (plain, norms):
        assert 0 < config["metrics"]["mismatch/logp_abs_diff_mean"] < 0.05
    assert plain["metrics"]["mismatch/logp_abs_diff_mean"] != norms["metrics"]["mismatch/logp_abs_diff_mean"]


def test_probe_flagged_islands_follow_the_range_check(tmp_path, tiny_path):
    """Nothing is flagged on the tiny model: ``flagged`` then keeps nothing in fp32 (and says so in probe.json)."""
    out = tmp_path / "flagged"
    result = CliRunner().invoke(app, ["probe", "--model-path", "tiny", "--dtypes", "fp16", "--batch-sizes", "2",
                                      "--num-samples", "2", "--max-new-tokens", "6", "--fp32-modules", "flagged",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "probe.json").read_text())
    assert doc["fp16_range"]["ok"] and doc["settings"]["fp32_modules"] == []
    assert "island_dtype" not in doc["configs"][0]["observed"]["trainer"]
