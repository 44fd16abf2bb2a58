"""The precision policy, the observed-dtype check and fp16 loss scaling."""

import pytest
import torch

from fp16rl.model.precision import DtypeRecorder, PrecisionError, PrecisionPolicy, check_observed, parse_dtype


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("float16", torch.float16), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("fp32", torch.float32), ("torch.float32", torch.float32)])
def test_parse_dtype_aliases(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_rejects_unknown():
    with pytest.raises(PrecisionError, match="float8"):
        parse_dtype("float8")


def test_policy_overrides_and_loss_scaling():
    policy = PrecisionPolicy.from_options("bf16", sampler_dtype="fp16")
    assert policy.sampler_dtype is torch.float16 and policy.trainer_dtype is torch.bfloat16
    assert policy.is_ablation and not policy.uses_loss_scaling
    fp16 = PrecisionPolicy.from_options("float16")
    scaler = fp16.grad_scaler("cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16 and scaler.get_growth_interval() == 400
    assert not PrecisionPolicy.from_options("bf16").grad_scaler("cpu").is_enabled()


def test_recorder_sees_autocast_compute_dtype():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    policy = PrecisionPolicy.from_options("bf16", trainer_compute="autocast")
    with DtypeRecorder().watch(layer) as rec, policy.autocast("cpu"):
        layer(torch.randn(2, 4))
    assert rec.report()["compute_dtype"] == "bfloat16" and rec.report()["weight_dtypes"] == "float32"
    assert not PrecisionPolicy.from_options("bf16").uses_autocast  # half_copy, the default, needs no autocast


def _report(compute, residual=None, logits=None, weights=None):
    return {"compute_dtype": compute, "residual_dtype": residual or compute, "logits_dtype": logits or compute,
            "weight_dtypes": weights or compute}


def test_check_observed_refuses_undeclared_disagreement():
    policy = PrecisionPolicy.from_options("float16")
    same = _report("float16")
    report = check_observed(policy, same, same)
    assert report["engines_agree"] and report["observed"]["sampler"] == same
    with pytest.raises(PrecisionError, match="sampler matmuls computed in bfloat16"):
        check_observed(policy, _report("bfloat16"), same)


def test_check_observed_catches_an_fp32_residual_stream():
    """The autocast trainer of full fine-tuning keeps the residual stream in fp32: caught unless declared."""
    autocast_trainer = _report("float16", residual="float32", weights="float32")
    with pytest.raises(PrecisionError, match="trainer residual computed in float32, expected float16"):
        check_observed(PrecisionPolicy.from_options("float16"), _report("float16"), autocast_trainer)
    declared = PrecisionPolicy.from_options("float16", trainer_compute="autocast")
    report = check_observed(declared, _report("float16"), autocast_trainer, full_finetune=True)
    assert report["engines_agree"] is False and report["declared"]["trainer_compute"] == "autocast"


def test_check_observed_allows_declared_ablation():
    policy = PrecisionPolicy.from_options("bfloat16", sampler_dtype="float16")
    report = check_observed(policy, _report("float16"), _report("bfloat16"))
    assert report["engines_agree"] is False


@pytest.mark.parametrize("compute,residual", [("half_copy", "float16"), ("autocast", "float32")])
def test_recorder_observes_residual_stream_and_logits(tiny_path, compute, residual):
    from fp16rl.model.loading import load_model
    from fp16rl.learner.weights import MasterWeights

    policy = PrecisionPolicy.from_options("float16", trainer_compute=compute)
    model = load_model(tiny_path)
    MasterWeights(model, policy)  # full fine-tuning: the model computes with the policy's weights
    with torch.no_grad(), DtypeRecorder().watch(model) as rec, policy.autocast("cpu"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert rec.report()["compute_dtype"] == "float16" and rec.report()["logits_dtype"] == "float16"
    assert rec.report()["residual_dtype"] == residual
