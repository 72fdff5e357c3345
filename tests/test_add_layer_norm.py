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
    out, mean, rstd, summed = torch.ops.fastvision.add_layer_norm_forward(x, residual, weight, bias, 1e-5)
    assert summed.shape == (0,)  # no return_residual: an empty placeholder
    assert out.dtype == torch.float64 and mean.dtype == rstd.dtype == torch.float32
    expected_out = add_layer_norm_reference(x, residual, weight, bias)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-12)
    grads = torch.ops.fastvision.add_layer_norm_backward(
        grad_out, x, residual, weight, bias, mean, rstd, None
    )
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
    returned = torch.full_like(x, float("nan"))
    _, mean, rstd, _ = add_layer_norm_forward(
        x, residual, weight, bias, 1e-5, out=out, return_residual=True, summed=returned
    )
    torch.testing.assert_close(returned, x + residual, atol=0, rtol=0)
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


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
@pytest.mark.parametrize("dim", [48, 96, 700, 768, 1536], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["both", "bias", "none"])
def test_triton_rows_held_as_three_blocks(dim, dtype, affine):
    """Rows of 3 x 2^k columns (and 700 in 3 x 256, the last block ragged) run as three blocks, no
    power-of-two padding: forward and backward against float64, with and without parameters."""
    from fastvision.triton_kernels.add_layer_norm import backward_tile, forward_tile

    assert forward_tile(dim).split == backward_tile(dim).split == 3
    assert not forward_tile(dim).chunked
    seed = stable_seed("split", dim, dtype, affine) % 2**31
    x, residual = _random((37, dim), dtype, seed), _random((37, dim), dtype, seed + 1, shift=3.0)
    weight, bias = _params(dim, dtype, seed + 2, weight=affine == "both", bias=affine != "none")
    _check_forward_backward(x, residual, weight, bias, "triton", seed=seed)


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
def test_triton_split_rows_write_every_output():
    """Three-block rows: every output, returned sum, statistic and gradient written (NaN-filled buffers),
    the returned sum's gradient added into dx."""
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward

    x, residual = _random((13, 760), torch.float32, 131), _random((13, 760), torch.float32, 132)
    weight, bias = _params(760, torch.float32, 133)
    out, returned = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _, mean, rstd, _ = add_layer_norm_forward(
        x, residual, weight, bias, 1e-5, out=out, return_residual=True, summed=returned
    )
    torch.testing.assert_close(returned, x + residual, atol=0, rtol=0)
    expected = add_layer_norm_reference(x.double(), residual.double(), weight.double(), bias.double())
    assert_close(out, expected, torch.float32)
    grad_out, grad_sum = _random((13, 760), torch.float32, 134), _random((13, 760), torch.float32, 135)
    dx = torch.full_like(x, float("nan"))
    _, dweight, dbias = add_layer_norm_backward(
        grad_out, x, residual, weight, bias, mean, rstd, out=dx, grad_summed=grad_sum
    )
    want = add_layer_norm_backward_reference(grad_out.double(), x.double(), residual.double(), weight)
    assert_close(dx, want[0] + grad_sum.double(), torch.float32, scale=BACKWARD_SCALE)
    assert_close(dweight, want[1], torch.float32, scale=BACKWARD_SCALE)
    assert_close(dbias, want[2], torch.float32, scale=BACKWARD_SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parameters_updated_in_place_are_read_afresh(backend, param_dtype):
    """The kernels read weight and bias as they are at each call (no copy kept between calls): an
    update in place, through autograd's view of the tensor or through ``.data`` (which the version
    counter does not see), shows in the next call, forward and backward."""
    x, residual = _random((9, 768), torch.bfloat16, 141), _random((9, 768), torch.bfloat16, 142)
    weight, bias = (p.to(param_dtype).requires_grad_(True) for p in _params(768, torch.float32, 143))
    grad_out = _random((9, 768), torch.bfloat16, 144)

    def run():
        with fastvision.use_backend(backend):
            out = add_layer_norm(x, residual, weight, bias)
            return out, *torch.autograd.grad(out, [weight, bias], grad_out)

    run()
    with torch.no_grad():
        weight.mul_(-2.0)
        bias.add_(1.0)
    weight.data[:5] = 3.0
    bias.data.copy_(bias.data.flip(0))
    out, dweight, dbias = run()
    ref_weight, ref_bias = weight.detach().double(), bias.detach().double()
    expected = add_layer_norm_reference(x.double(), residual.double(), ref_weight, ref_bias)
    assert_close(out, expected, torch.bfloat16, scale=FORWARD_SCALE * _conditioning(x, residual, 1e-5))
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (weight, bias)]
    ref_out = add_layer_norm_reference(x.double(), residual.double(), *ref_inputs)
    # Held to x's (bf16) tolerance: the reference backend forms x_hat in bf16; a stale parameter
    # (scaled by -2, shifted, partly overwritten) would miss by O(1).
    wants = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())
    for got, want in zip((dweight, dbias), wants, strict=True):
        assert_close(got, want, torch.bfloat16, scale=BACKWARD_SCALE * 3)


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
    forward_op = getattr(torch.ops.fastvision, forward).default
    torch.library.opcheck(forward_op, (x, residual, weight, bias, 1e-5))
    torch.library.opcheck(forward_op, (x, residual, weight, bias, 1e-5, True))
    _, mean, rstd, _ = forward_op(x, residual, weight, bias, 1e-5)
    grad_out = _random((3, 5, 18), torch.float32, seed=24)
    grad_summed = _random((3, 5, 18), torch.float32, seed=25)
    detached = [None if t is None else t.detach() for t in (x, residual, weight, bias)]
    backward_op = getattr(torch.ops.fastvision, backward).default
    torch.library.opcheck(backward_op, (grad_out, *detached, mean, rstd, None))
    torch.library.opcheck(backward_op, (grad_out, *detached, mean, rstd, grad_summed))


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


# --- return_residual: the pre-norm residual stream from the same pass --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 7), (2, 129), (3, 768), (2, 4097)], ids=str)
def test_return_residual(backend, dtype, shape):
    seed = stable_seed("return_residual", shape, dtype) % 2**31
    x, residual = _random(shape, dtype, seed), _random(shape, dtype, seed + 1, shift=3.0)
    weight, bias = _params(shape[-1], dtype, seed + 2)
    grad_out, grad_sum = _random(shape, dtype, seed + 3), _random(shape, dtype, seed + 4)
    inputs = [t.detach().requires_grad_(True) for t in (x, residual, weight, bias)]
    with fastvision.use_backend(backend):
        out, summed = add_layer_norm(*inputs, 1e-5, return_residual=True)
        grads = torch.autograd.grad([out, summed], inputs, [grad_out, grad_sum])
        plain = add_layer_norm(*inputs, 1e-5)
    # The sum is the eager x + residual, rounded once to x's dtype; the output is the plain op's.
    # (Triton's interpreter converts float32 to bfloat16 by truncation, a GPU rounds to nearest:
    # one bfloat16 step there.)
    truncates = backend == "triton" and DEVICE.type != "cuda" and dtype == torch.bfloat16
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=2**-7 if truncates else 0)
    assert summed.dtype == dtype and summed.shape == shape
    torch.testing.assert_close(out, plain, atol=0, rtol=0)

    ref_inputs = [t.detach().double().requires_grad_(True) for t in (x, residual, weight, bias)]
    ref_out, ref_summed = add_layer_norm_reference(*ref_inputs, 1e-5, return_residual=True)
    expected = torch.autograd.grad([ref_out, ref_summed], ref_inputs, [grad_out.double(), grad_sum.double()])
    conditioning = _conditioning(x, residual, 1e-5) if backend == "reference" else 1.0
    rows = math.sqrt(max(1, x.numel() // shape[-1]))
    for i, (grad, want) in enumerate(zip(grads, expected, strict=True)):
        scale = BACKWARD_SCALE * conditioning * (rows if i >= 2 and backend == "reference" else 1.0)
        assert_close(grad, want, dtype, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_residual_sum_gradient_only(backend):
    """Only the returned sum is used: its gradient reaches x and residual unchanged (the normalized
    output's gradient is zero), and the parameters get zero gradients."""
    x, residual = _random((4, 24), torch.float32, 131), _random((4, 24), torch.float32, 132)
    weight, bias = _params(24, torch.float32, 133)
    inputs = [t.detach().requires_grad_(True) for t in (x, residual, weight, bias)]
    grad_sum = _random((4, 24), torch.float32, 134)
    with fastvision.use_backend(backend):
        _, summed = add_layer_norm(*inputs, return_residual=True)
        grads = torch.autograd.grad(summed, inputs, grad_sum, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(grads[0], grad_sum, atol=0, rtol=0)
    torch.testing.assert_close(grads[1], grad_sum, atol=0, rtol=0)
    for grad in grads[2:]:
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_residual_empty(backend):
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out, summed = add_layer_norm(x, x, return_residual=True)
        (out.sum() + summed.sum()).backward()
    assert out.shape == summed.shape == (0, 8) and x.grad.shape == (0, 8)


def test_return_residual_must_be_bool():
    with pytest.raises(TypeError, match="return_residual must be a bool"):
        add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), return_residual=1)


def test_module_return_residual():
    module = AddLayerNorm(12)
    x, residual = _random((3, 12), torch.float32, 141), _random((3, 12), torch.float32, 142)
    out, summed = module(x, residual, return_residual=True)
    torch.testing.assert_close(out, module(x, residual), atol=0, rtol=0)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)


# --- rows at the edge of float32 ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [8, 5000], ids=["whole-row", "chunked"])
@pytest.mark.parametrize("magnitude", [1e38, 3e38], ids=["1e38", "3e38"])
def test_rows_near_the_float32_maximum(backend, dim, magnitude):
    """Alternating +-m rows (mean 0, deviation m): every backend gives +-1, as the reference does;
    partial sums and differences (m - (-m)) overflow float32 unless formed in halves."""
    x = torch.full((2, dim), magnitude, device=DEVICE)
    x[:, ::2] = -magnitude
    x[1] = x[1].flip(-1)  # the row's first element (the mean's shift) of either sign
    with fastvision.use_backend(backend):
        out = add_layer_norm(x, 0 * x)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out, torch.sign(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_between_large_and_huge_values(backend):
    x = _random((3, 37), torch.float32, 151) * 1e37
    x[0, 0] = 3.3e38
    x[1, 3] = -3.3e38
    with fastvision.use_backend(backend):
        out = add_layer_norm(x, torch.zeros_like(x))
    expected = add_layer_norm_reference(x.double(), torch.zeros_like(x).double())
    assert_close(out, expected, torch.float32, scale=FORWARD_SCALE)


# --- direct calls of the registered ops: the public checks, once -------------------------------------


def test_cpp_forward_rejects_bad_eps():
    if not CPP_OPS_BUILT:
        pytest.skip("the C++ CPU kernels are not built")
    x = torch.randn(4, 8)
    for eps in (-1.0, 0.0, math.nan):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            torch.ops.fastvision.add_layer_norm_forward(x, x, None, None, eps)


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
def test_triton_ops_check_their_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    forward = torch.ops.fastvision.add_layer_norm_triton_forward
    backward = torch.ops.fastvision.add_layer_norm_triton_backward
    with pytest.raises(ValueError, match="residual must have x's shape"):
        forward(x, torch.randn(4, 7, device=DEVICE), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        forward(x, x, torch.ones(3, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        forward(x, x, None, None, -1.0)
    # What the public op prepares (one dtype, contiguous parameters) a direct call must pass.
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        forward(x, x.half(), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        forward(x, x, torch.ones(16, device=DEVICE)[::2], None, 1e-5)
    _, mean, rstd, _ = forward(x, x, None, None, 1e-5)
    with pytest.raises(ValueError, match="mean must be float32 of shape"):
        backward(x, x, x, None, None, mean[:2], rstd, None)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        backward(x[:2], x, x, None, None, mean, rstd, None)
    with pytest.raises(ValueError, match="grad_summed must have x's shape"):
        backward(x, x, x, None, None, mean, rstd, x[:, :4])
