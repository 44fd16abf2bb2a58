"""The precision policy, the observed-dtype check and fp16 loss scaling."""

import pytest
import torch

from fp16rl.precision import DtypeRecorder, PrecisionError, PrecisionPolicy, check_observed, parse_dtype


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
    policy = PrecisionPolicy.from_options("bf16")
    with DtypeRecorder().watch(layer) as rec, policy.autocast("cpu"):
        layer(torch.randn(2, 4))
    assert rec.report() == {"compute_dtype": "bfloat16", "weight_dtypes": "float32"}


def test_check_observed_refuses_undeclared_disagreement():
    policy = PrecisionPolicy.from_options("float16")
    same = {"compute_dtype": "float16", "weight_dtypes": "float16"}
    report = check_observed(policy, same, same)
    assert report["engines_agree"] and report["observed"]["sampler"] == same
    with pytest.raises(PrecisionError, match="sampler computed in bfloat16"):
        check_observed(policy, {"compute_dtype": "bfloat16", "weight_dtypes": "bfloat16"}, same)


def test_check_observed_allows_declared_ablation():
    policy = PrecisionPolicy.from_options("bfloat16", sampler_dtype="float16")
    report = check_observed(policy, {"compute_dtype": "float16", "weight_dtypes": "float16"},
                            {"compute_dtype": "bfloat16", "weight_dtypes": "float32"})
    assert report["engines_agree"] is False
