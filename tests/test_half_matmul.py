"""Half-precision linears widened to float32 on CPUs without a half kernel (``fp16rl.model.half_matmul``):
the same numbers as the half kernel up to the order of float32 sums (forward, both backward matmuls, the
bias gradient, under autocast), float32 untouched, the model's parameters and state dict unchanged, and
the fast decoder still equal to Hugging Face's path. The widening is forced here, so the tests check it
on every CPU, also one that has both kernels."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fp16rl.model import half_matmul
from fp16rl.model.half_matmul import WidenedLinear, widen_linears, widened_linear
from fp16rl.model.loading import TinyModelSpec, load_model, tiny_model_path

HALVES = [torch.bfloat16, torch.float16]


@pytest.fixture
def widen_every_half(monkeypatch):
    """Pretend this CPU has neither half kernel, so that ``widened_linear`` widens both dtypes."""
    monkeypatch.setattr(half_matmul, "emulated_dtypes", lambda: frozenset(HALVES))


def _spacing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dtype's unit in the last place at max(|a|, |b|), elementwise (float32)."""
    info = torch.finfo(a.dtype)
    larger = torch.maximum(a.float().abs(), b.float().abs())
    _, exponent = torch.frexp(larger)  # larger = m * 2**exponent, 0.5 <= m < 1
    return torch.ldexp(torch.full_like(larger, info.eps), exponent - 1).clamp_min(info.smallest_normal * info.eps)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of the dtype at max(|a|, |b|) (0 where equal)."""
    return (a.float() - b.float()).abs() / _spacing(a, b)


def _linear_and_grads(linear, x, weight, bias, grad):
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    out = linear(x, weight, bias)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("dtype", HALVES)
def test_widened_linear_computes_what_the_half_kernel_computes(dtype, widen_every_half):
    """Forward, input gradient, weight gradient and bias gradient against torch's own half ``F.linear``:
    nearly all bitwise equal, no farther from a float64 reference, and every difference within what two
    float32 summation orders allow: one unit in the last place of the result, plus the float32 sums'
    error bound 2 n u sum|terms| (n terms, u = 2^-24; where terms cancel, the result is small and their
    rounding counts). A 3-D input, as a transformer's hidden states are."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 192, generator=generator).to(dtype)
    weight = (torch.randn(96, 192, generator=generator) / 8).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    grad = torch.randn(3, 7, 96, generator=generator).to(dtype)
    native = _linear_and_grads(F.linear, x, weight, bias, grad)
    widened = _linear_and_grads(widened_linear, x, weight, bias, grad)
    exact = _linear_and_grads(F.linear, *(t.double() for t in (x, weight, bias, grad)))
    # Bilinear in its inputs: with |inputs| every output is its sum of |terms|.
    magnitude = _linear_and_grads(F.linear, *(t.double().abs() for t in (x, weight, bias, grad)))
    terms = 192 + 1  # the longest sum (the input's features, and the bias)
    for name, a, b, truth, size in zip(("out", "grad x", "grad weight", "grad bias"), native, widened, exact, magnitude):
        assert b.dtype == dtype and b.shape == a.shape, name
        allowed = 1.0 + 2 * terms * 2.0**-24 * size / _spacing(a, b)
        assert (_ulps_apart(a, b) <= allowed).all(), name
        assert (a == b).float().mean() >= 0.9, name
        native_error, widened_error = ((t.double() - truth).abs().mean() for t in (a, b))
        assert widened_error <= native_error * 1.1, name


def test_float32_and_mixed_dtypes_are_f_linear_itself(widen_every_half):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(5, 16, generator=generator), torch.randn(8, 16, generator=generator), torch.randn(8)
    assert torch.equal(widened_linear(x, weight, bias), F.linear(x, weight, bias))
    with pytest.raises(RuntimeError):  # F.linear's own refusal, not a silent cast
        widened_linear(x.bfloat16(), weight, bias)


@pytest.mark.parametrize("dtype", HALVES)
def test_under_autocast_the_inputs_are_cast_first(dtype, widen_every_half):
    """FP32 master weights under CPU autocast (``--trainer-compute autocast``): the output in the autocast
    dtype, within one unit of autocast's own ``F.linear``, and FP32 gradients reach the FP32 weights."""
    generator = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(4, 6, 64, generator=generator), torch.randn(32, 64, generator=generator), torch.randn(32)
    results = []
    for linear in (F.linear, widened_linear):
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = linear(x, w, bias)
        out.float().sum().backward()
        results.append((out.detach(), w.grad))
    (native, native_grad), (widened, widened_grad) = results
    assert widened.dtype == dtype and widened_grad.dtype == torch.float32
    assert _ulps_apart(native, widened).max() <= 1.0
    torch.testing.assert_close(widened_grad, native_grad, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def _tiny(dtype: torch.dtype) -> torch.nn.Module:
    return load_model(tiny_model_path(TinyModelSpec(arch="llama")), dtype=dtype).eval()


@pytest.mark.parametrize("dtype", HALVES)
def test_a_widened_model_keeps_its_parameters_and_computes_the_same_logits(dtype, widen_every_half):
    """``widen_linears`` changes the linears' class only: the same parameters and state dict, a deep copy
    (the sampler's) keeps the class, the logits are the native half model's within rounding, and it is
    idempotent."""
    native = _tiny(dtype)
    for module in native.modules():  # load_model widened where this CPU lacks the kernel: undo for the reference
        if type(module) is WidenedLinear:
            module.__class__ = torch.nn.Linear
    widened = widen_linears(copy.deepcopy(native))
    linears = [m for m in widened.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is WidenedLinear for m in linears)
    assert widen_linears(widened) is widened
    assert all(type(m) is WidenedLinear for m in copy.deepcopy(widened).modules() if isinstance(m, torch.nn.Linear))
    assert list(native.state_dict()) == list(widened.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), widened.state_dict().values()))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = native(ids).logits.float(), widened(ids).logits.float()
    # A few units of the dtype at the logits' size: single roundings differ, and the differences carry through.
    assert (a - b).abs().max() <= 8 * torch.finfo(dtype).eps * a.abs().max()


def test_nothing_is_swapped_where_the_cpu_has_both_kernels(monkeypatch):
    monkeypatch.setattr(half_matmul, "emulated_dtypes", lambda: frozenset())
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert all(type(m) is torch.nn.Linear for m in widen_linears(model))


@pytest.mark.parametrize("dtype", HALVES)
def test_the_fast_decoder_still_computes_what_hugging_face_computes(dtype, widen_every_half):
    """The sampler's lean decode loop calls ``widened_linear`` where the model holds ``WidenedLinear``s,
    so its logits stay those of the Hugging Face cache path on the same model."""
    from fp16rl.model.forward import left_pad
    from fp16rl.rollout.fast_decode import LlamaFamilyDecoder
    from fp16rl.rollout.hf_decoder import HFCacheDecoder

    model = widen_linears(_tiny(dtype))
    input_ids, attention = left_pad([[5, 6, 7, 8, 9], [12, 13]], 0)
    decoders = [HFCacheDecoder(model, 4), LlamaFamilyDecoder(model, 4)]
    with torch.inference_mode():
        outputs = [[decoder.prefill(input_ids, attention)] for decoder in decoders]
        for token in (40, 41, 42):
            for decoder, out in zip(decoders, outputs):
                out.append(decoder.step(torch.tensor([token, token + 7])))
    for hf, fast in zip(*outputs):
        assert torch.equal(hf, fast)


@pytest.mark.parametrize("dtype", HALVES)
def test_fixed_weights_widened_once_compute_what_widened_linear_computes(dtype, widen_every_half):
    """The decode loop's layers (``widened_with``): float32 weights made once, bitwise the same outputs as
    ``widened_linear``; with gradients on (training) it is ``widened_linear`` itself."""
    from fp16rl.model.half_matmul import widened_with

    generator = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(48, 32, generator=generator).to(dtype), torch.randn(48, generator=generator).to(dtype)
    x = torch.randn(6, 1, 32, generator=generator).to(dtype)
    linear = widened_with(weight, bias)
    with torch.inference_mode():
        assert torch.equal(linear(x), widened_linear(x, weight, bias))
    trained = weight.clone().requires_grad_(True)
    out = widened_with(trained, bias)(x)
    assert out.requires_grad and torch.equal(out.detach(), widened_linear(x, weight, bias))


def test_edge_shapes_and_float64_under_autocast(widen_every_half):
    """A 1-D input and an empty batch have gradients of their own shapes; float64 under autocast is left
    alone, as autocast leaves it."""
    weight = torch.randn(3, 5).bfloat16().requires_grad_(True)
    for shape in ((5,), (0, 5)):
        x = torch.randn(shape).bfloat16().requires_grad_(True)
        widened_linear(x, weight).float().sum().backward()
        assert x.grad.shape == x.shape and weight.grad.shape == weight.shape
    x64, w64 = torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(widened_linear(x64, w64), F.linear(x64, w64))
