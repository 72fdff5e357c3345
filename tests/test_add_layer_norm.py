"""add_layer_norm: every backend against the float64 reference, forward and backward; registration; errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, REQUIRED_BACKENDS, assert_close, backend_params, stable_seed
from torch import nn

import fastvision
from fastvision._backend import why_unusable
from fastvision.nn.add_layer_norm import AddLayerNorm
from fastvision.ops import OPS
from fastvision.ops.add_layer_norm import (
    TRITON_MAX_DIM,
    add_layer_norm,
    add_layer_norm_backward_reference,
    add_layer_norm_reference,
)

BACKENDS = backend_params(OPS["add_layer_norm"].backends)
CPP_OPS_BUILT = OPS["add_layer_norm"].built("cpu") is None
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (7, 1),  # D = 1: every output is the bias
    (5, 3, 7),  # three dims
    (2, 129),  # one past a power of two
    (3, 1000),
    (2, 4097),
    (300, 257),  # several row blocks (and backward programs), a ragged last block
]
# The kernels sum x + residual in float32 and round once on output: allow a few roundings of the
# storage type (backward sums over the row and over rows).
FORWARD_SCALE = 2.0
BACKWARD_SCALE = 4.0


def _conditioning(x: torch.Tensor, residual: torch.Tensor, eps: float) -> float:
    """How much a rounding of ``x + residual`` is amplified: ``max |s| * rstd`` over the rows.

    The reference backend rounds the sum to the storage dtype before normalizing (as eager PyTorch
    does), and normalizing divides that error by the row's spread: for ``D = 1`` by ``sqrt(eps)``.
    """
    summed = x.detach().double() + residual.detach().double()
    if summed.numel() == 0:
        return 1.0
    rstd = torch.rsqrt(summed.var(-1, unbiased=False) + eps)
    return max(1.0, (summed.abs().amax(-1) * rstd).max().item())


def _random(shape, dtype, seed, device=DEVICE, scale=2.0, shift=0.0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=device, dtype=dtype)


def _params(dim, dtype, seed, weight=True, bias=True):
    w = _random((dim,), dtype, seed, scale=0.5, shift=1.0) if weight else None
    b = _random((dim,), dtype, seed + 1, scale=0.5) if bias else None
    return w, b


def _check_forward_backward(x, residual, weight, bias, backend, eps=1e-5, seed=0, grad_out=None):
    before = [t.clone() for t in (x, residual, weight, bias) if t is not None]
    if grad_out is None:
        grad_out = _random(x.shape, x.dtype, seed + 2, x.device)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]

    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_x, ref_residual = ref_inputs[:2]
    ref_weight = ref_inputs[2] if weight is not None else None
    ref_bias = ref_inputs[-1] if bias is not None else None
    expected = add_layer_norm_reference(ref_x, ref_residual, ref_weight, ref_bias, eps)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())

    inputs = [t.detach().requires_grad_(True) for t in inputs]
    x_, residual_ = inputs[:2]
    weight_ = inputs[2] if weight is not None else None
    bias_ = inputs[-1] if bias is not None else None
    with fastvision.use_backend(backend):
        out = add_layer_norm(x_, residual_, weight_, bias_, eps)
        grads = torch.autograd.grad(out, inputs, grad_out)

    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    if backend == "reference":
        # Eager PyTorch in the storage dtype rounds x + residual before normalizing and sums the
        # parameter grads over rows at x's precision: looser bounds for it, not for the kernels.
        conditioning = _conditioning(x, residual, eps)
        param_dtype, param_scale = x.dtype, conditioning * math.sqrt(max(1, x.numel() // x.shape[-1]))
    else:
        conditioning, param_dtype, param_scale = 1.0, None, 1.0
    assert_close(out, expected, x.dtype, scale=FORWARD_SCALE * conditioning)
    for i, (tensor, grad, expected_grad) in enumerate(zip(inputs, grads, expected_grads, strict=True)):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
        if i < 2:  # x and residual
            assert_close(grad, expected_grad, x.dtype, scale=BACKWARD_SCALE * conditioning)
        else:  # a float32 parameter's grad is held to float32 tolerance even when x is half
            assert_close(grad, expected_grad, param_dtype or tensor.dtype, scale=BACKWARD_SCALE * param_scale)
    after = [t for t in (x, residual, weight, bias) if t is not None]
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new.detach(), old, atol=0, rtol=0)  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    seed = stable_seed(shape, dtype) % 2**31
    # A shifted residual: the mean is far from zero, as in a real residual stream.
    x, residual = _random(shape, dtype, seed), _random(shape, dtype, seed + 1, shift=3.0)
    weight, bias = _params(shape[-1], dtype, seed + 5)
    _check_forward_backward(x, residual, weight, bias, backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parameters_with_half_inputs(backend, dtype):
    x, residual = _random((6, 70), dtype, 31), _random((6, 70), dtype, 32)
    weight, bias = _params(70, torch.float32, 33)
    _check_forward_backward(x, residual, weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "has_weight, has_bias", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"]
)
def test_optional_parameters(backend, has_weight, has_bias):
    x, residual = _random((6, 33), torch.float32, 41), _random((6, 33), torch.float32, 42)
    weight, bias = _params(33, torch.float32, 43, weight=has_weight, bias=has_bias)
    _check_forward_backward(x, residual, weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_dim(backend):
    x, residual = _random((2, 16384), torch.float32, 51), _random((2, 16384), torch.float32, 52)
    _check_forward_backward(x, residual, *_params(16384, torch.float32, 53), backend)


@pytest.mark.parametrize("shape", [(3, 5), (4, 37), (2, 1000)], ids=str)
def test_cpu_ops_in_float64(shape):
    """The public op takes float32/16/bf16; the C++ ops also dispatch float64 (double math, float32
    statistics, as every backend saves them), reachable through torch.ops."""
    if not CPP_OPS_BUILT:
        assert "cpu" not in REQUIRED_BACKENDS, "the C++ CPU kernels are required but not built"
        pytest.skip("the C++ CPU kernels are not built")
    x, residual, grad_out = (_random(shape, torch.float64, seed, "cpu") for seed in (71, 72, 73))
    weight, bias = (_random(shape[-1:], torch.float64, seed, "cpu") for seed in (74, 75))
    out, mean, rstd = torch.ops.fastvision.add_layer_norm_forward(x, residual, weight, bias, 1e-5)
    assert out.dtype == torch.float64 and mean.dtype == rstd.dtype == torch.float32
    expected_out = add_layer_norm_reference(x, residual, weight, bias)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-12)
    grads = torch.ops.fastvision.add_layer_norm_backward(grad_out, x, residual, weight, bias, mean, rstd)
    expected = add_layer_norm_backward_reference(grad_out, x, residual, weight)
    for grad, want in zip(grads, expected, strict=True):
        assert grad.dtype == torch.float64
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)  # float32 mean/rstd


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_matters(backend):
    # A nearly constant row: the variance is tiny and eps dominates rstd.
    x = _random((4, 40), torch.float32, 61, scale=1e-3)
    residual = _random((4, 40), torch.float32, 62, scale=1e-3)
    _check_forward_backward(x, residual, *_params(40, torch.float32, 63), backend, eps=1e-2)
    with fastvision.use_backend(backend):
        small, large = add_layer_norm(x, residual, eps=1e-6), add_layer_norm(x, residual, eps=1e-2)
    assert (small - large).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t[:, :, :20], id="row-strided"),  # unit last stride, rows of 64
        pytest.param(lambda t: t[:, :, ::2], id="last-dim-strided"),
        pytest.param(lambda t: t.transpose(0, 1), id="transposed"),
        pytest.param(lambda t: t[1:, :, 4:24], id="offset-view"),
    ],
)
def test_non_contiguous(backend, make):
    x = make(_random((6, 5, 64), torch.float32, seed=11))
    residual = make(_random((6, 5, 64), torch.float32, seed=12)).contiguous()  # layouts differ
    grad_out = make(_random((6, 5, 64), torch.float32, seed=13))
    assert not x.is_contiguous()
    weight, bias = _params(x.shape[-1], torch.float32, 14)
    _check_forward_backward(x, residual, weight, bias, backend, grad_out=grad_out)
    _check_forward_backward(residual, x, weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_parameters(backend):
    x, residual = _random((3, 16), torch.float32, 71), _random((3, 16), torch.float32, 72)
    weight, bias = _random((16, 2), torch.float32, 73)[:, 0], _random((32,), torch.float32, 74)[::2]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    _check_forward_backward(x, residual, weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out(backend):
    """``out.sum().backward()`` hands the op a stride-0 gradient."""
    x, residual = _random((5, 24), torch.float32, 81), _random((5, 24), torch.float32, 82)
    weight, bias = _params(24, torch.float32, 83)
    _check_forward_backward(x, residual, weight, bias, backend, grad_out=torch.ones(1, 1).expand(5, 24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_grads_are_independent(backend):
    x = _random((4, 8), torch.float32, 91).requires_grad_(True)
    residual = _random((4, 8), torch.float32, 92).requires_grad_(True)
    with fastvision.use_backend(backend):
        add_layer_norm(x, residual, *_params(8, torch.float32, 93)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, residual.grad, atol=0, rtol=0)
    expected = residual.grad.clone()
    x.grad.zero_()
    torch.testing.assert_close(residual.grad, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 4), (2, 0)], ids=str)
def test_empty(backend, shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    residual = torch.randn(shape, device=DEVICE, requires_grad=True)
    weight = torch.randn(shape[-1], device=DEVICE, requires_grad=True)
    bias = torch.randn(shape[-1], device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out = add_layer_norm(x, residual, weight, bias)
        out.sum().backward()
    assert out.shape == shape
    assert x.grad.shape == shape and residual.grad.shape == shape
    # No rows: the parameter gradients are sums over nothing.
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias))


def test_closed_form_backward_matches_autograd():
    x, residual = _random((4, 3, 19), torch.float64, 101), _random((4, 3, 19), torch.float64, 102)
    weight = _random((19,), torch.float64, 103)
    grad_out = _random((4, 3, 19), torch.float64, 104)
    inputs = [t.clone().requires_grad_(True) for t in (x, residual, weight)]
    bias = torch.zeros(19, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(add_layer_norm_reference(*inputs, bias), [*inputs, bias], grad_out)
    dx, dweight, dbias = add_layer_norm_backward_reference(grad_out, x, residual, weight)
    for actual, want in zip((dx, dx, dweight, dbias), expected, strict=True):
        torch.testing.assert_close(actual, want)


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
def test_triton_poisoned_outputs_are_overwritten():
    """The kernels must write every output element and statistic: start from NaN-filled buffers."""
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward

    x, residual = _random((37, 129), torch.float32, 111), _random((37, 129), torch.float32, 112)
    weight, bias = _params(129, torch.float32, 113)
    out = torch.full_like(x, float("nan"))
    _, mean, rstd = add_layer_norm_forward(x, residual, weight, bias, 1e-5, out=out)
    summed = (x + residual).double()
    expected = add_layer_norm_reference(x.double(), residual.double(), weight.double(), bias.double())
    assert_close(out, expected, torch.float32)
    assert_close(mean, summed.mean(-1), torch.float32)
    assert_close(rstd, torch.rsqrt(summed.var(-1, unbiased=False) + 1e-5), torch.float32)

    grad_out = _random((37, 129), torch.float32, 114)
    dx = torch.full_like(x, float("nan"))
    _, dweight, dbias = add_layer_norm_backward(grad_out, x, residual, weight, bias, mean, rstd, out=dx)
    expected = add_layer_norm_backward_reference(grad_out.double(), x.double(), residual.double(), weight)
    for actual, want in zip((dx, dweight, dbias), expected, strict=True):
        assert_close(actual, want, torch.float32, scale=BACKWARD_SCALE)


# --- errors --------------------------------------------------------------------------------------


def test_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"residual must have x's shape \[4, 8\]"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 1))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_mixed_dtypes_promote_like_addition(backend):
    x = _random((4, 8), torch.bfloat16, 81)
    residual = _random((4, 8), torch.float32, 82)
    with fastvision.use_backend(backend):
        out = add_layer_norm(x, residual)
    assert out.dtype == torch.float32
    expected = add_layer_norm_reference(x.double(), residual.double())
    assert_close(out, expected, torch.float32, scale=FORWARD_SCALE)


def test_rejects_integer_residual():
    with pytest.raises(TypeError, match="residual must have dtype"):
        add_layer_norm(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.int64))


def test_rejects_integer_dtype():
    with pytest.raises(TypeError, match="x must have dtype"):
        add_layer_norm(torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        add_layer_norm(torch.randn(2, 3), [1.0, 2.0, 3.0])


def test_rejects_scalar():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        add_layer_norm(torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_rejects_bad_parameter_shape(name):
    with pytest.raises(ValueError, match=rf"{name} must have shape \[8\]"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), **{name: torch.ones(4)})
    with pytest.raises(ValueError, match=rf"{name} must have shape \[8\]"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), **{name: torch.ones(1, 8)})


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_rejects_bad_parameter_dtype(name):
    with pytest.raises(TypeError, match=f"{name} must have x's dtype"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), **{name: torch.ones(8, dtype=torch.float16)})


def test_rejects_parameter_on_another_device():
    with pytest.raises(ValueError, match="weight on meta"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), weight=torch.ones(8, device="meta"))


@pytest.mark.parametrize("eps", [0.0, -1e-5, "1e-5"])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), eps=eps)


def test_forced_backend_that_cannot_run_raises():
    with fastvision.use_backend("cuda"), pytest.raises(fastvision.BackendUnavailableError, match="cuda"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
def test_forced_triton_rejects_too_long_rows():
    x = torch.randn(1, TRITON_MAX_DIM + 1, device=DEVICE)
    with fastvision.use_backend("triton"), pytest.raises(fastvision.BackendUnavailableError, match="up to"):
        add_layer_norm(x, x)


# --- registration: opcheck, compile, export --------------------------------------------------------


def _registered_ops(device: torch.device):
    ops = []
    if CPP_OPS_BUILT:
        ops.append(pytest.param("add_layer_norm_forward", "add_layer_norm_backward", id="cpp"))
    if why_unusable("triton", device) is None:
        ops.append(
            pytest.param("add_layer_norm_triton_forward", "add_layer_norm_triton_backward", id="triton")
        )
    return ops


@pytest.mark.parametrize("forward, backward", _registered_ops(DEVICE))
@pytest.mark.parametrize("has_params", [True, False], ids=["affine", "plain"])
def test_opcheck(forward, backward, has_params):
    x = _random((3, 5, 18), torch.float32, seed=21).requires_grad_(True)
    residual = _random((3, 5, 18), torch.float32, seed=22).requires_grad_(True)
    weight, bias = _params(18, torch.float32, 23) if has_params else (None, None)
    if has_params:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.fastvision, forward).default, (x, residual, weight, bias, 1e-5))
    _, mean, rstd = getattr(torch.ops.fastvision, forward)(x, residual, weight, bias, 1e-5)
    grad_out = _random((3, 5, 18), torch.float32, seed=24)
    detached = [None if t is None else t.detach() for t in (x, residual, weight, bias)]
    torch.library.opcheck(getattr(torch.ops.fastvision, backward).default, (grad_out, *detached, mean, rstd))


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = AddLayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch.manual_seed(0)
    module = _ResidualBlock(16).to(DEVICE)
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.uniform_(-0.5, 0.5)
    x = _random((2, 5, 16), torch.float32, seed=13).requires_grad_(True)
    x_eager = x.detach().clone().requires_grad_(True)
    params = [x, module.norm.weight, module.norm.bias]
    with fastvision.use_backend(backend):
        expected = module(x_eager)
        expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x_eager, *params[1:]])
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        grads = torch.autograd.grad(out.pow(2).sum(), params)
    torch.testing.assert_close(out, expected)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export(backend):
    torch.manual_seed(0)
    module = _ResidualBlock(16).eval().to(DEVICE)
    x = _random((2, 5, 16), torch.float32, seed=14)
    with fastvision.use_backend(backend):
        exported = torch.export.export(module, (x,))
        expected = module(x)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    if backend != "reference":
        assert any("fastvision" in t and "add_layer_norm" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), expected)


# --- the module ------------------------------------------------------------------------------------


def test_module_state_dict_matches_layer_norm():
    assert set(AddLayerNorm(12).state_dict()) == set(nn.LayerNorm(12).state_dict()) == {"weight", "bias"}
    module = AddLayerNorm(12, eps=1e-6)
    assert module.weight.shape == module.bias.shape == (12,)
    assert "eps=1e-06" in repr(module)


@pytest.mark.parametrize(
    "kwargs", [{}, {"elementwise_affine": False}, {"bias": False}], ids=["affine", "plain", "no-bias"]
)
def test_from_layer_norm(kwargs):
    torch.manual_seed(0)
    layer_norm = nn.LayerNorm(24, eps=1e-6, **kwargs)
    if layer_norm.weight is not None:
        with torch.no_grad():
            layer_norm.weight.uniform_(0.5, 1.5)
            if layer_norm.bias is not None:
                layer_norm.bias.uniform_(-0.5, 0.5)
    module = AddLayerNorm.from_layer_norm(layer_norm)
    assert module.eps == 1e-6 and set(module.state_dict()) == set(layer_norm.state_dict())
    x, residual = _random((3, 24), torch.float32, 121), _random((3, 24), torch.float32, 122)
    torch.testing.assert_close(module(x, residual), layer_norm(x + residual), atol=1e-5, rtol=1e-5)
    if layer_norm.weight is not None:  # a copy, not shared storage
        assert module.weight.data_ptr() != layer_norm.weight.data_ptr()


def test_from_layer_norm_rejects_multi_dim_shape():
    with pytest.raises(ValueError, match="one \\(the last\\) dimension"):
        AddLayerNorm.from_layer_norm(nn.LayerNorm((4, 6)))
