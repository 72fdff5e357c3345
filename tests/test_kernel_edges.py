"""Numerical edges of the geglu and add_layer_norm kernels (cpu and triton backends) against float64.

* geglu: gates at and near +-inf (and where g^3 overflows float32) give the exact limits
  ``gelu(-inf) = 0``, ``gelu(+inf) = inf`` in forward and backward, in both GELU forms.
* add_layer_norm: rows whose ``x + residual`` nears 1e19-1e20 (float32 squares overflow) give the
  finite true result; rows of identical values normalize to exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastvision
from fastvision.ops import add_layer_norm, geglu
from tests.conftest import DEVICE, backend_params

BACKENDS = backend_params(("cpu", "triton"))
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

GATES = [
    -math.inf, -3e38, -1e36, -1e20, -1e12, -1e4, -60.0, -20.0, -8.0, -3.0, -0.5, 0.0,
    0.5, 3.0, 8.0, 20.0, 60.0, 1e4, 1e12, 1e20, 1e36, 3e38, math.inf,
]  # fmt: skip


def _gelu_truth(gate: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu and its derivative in float64, with their limits where |g| > 50 (0 or g; 0 or 1)."""
    g = gate.double()
    far = g.abs() > 50
    near = torch.where(far, torch.zeros_like(g), g)
    if approximate == "tanh":
        t = torch.tanh(SQRT_2_OVER_PI * (near + 0.044715 * near**3))
        gelu = 0.5 * near * (1 + t)
        grad = 0.5 * (1 + t) + 0.5 * near * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * near**2)
    else:
        cdf = 0.5 * (1 + torch.erf(near / math.sqrt(2.0)))
        gelu = near * cdf
        grad = cdf + near * torch.exp(-0.5 * near * near) / math.sqrt(2 * math.pi)
    gelu = torch.where(far, torch.where(g > 0, g, torch.zeros_like(g)), gelu)
    grad = torch.where(far, (g > 0).double(), grad)
    return gelu, grad


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_limits_at_huge_and_infinite_gates(backend, approximate, dtype):
    gate = torch.tensor(GATES, dtype=dtype, device=DEVICE)
    generator = torch.Generator().manual_seed(13)
    # |value|, grad_out < 1.1: products with the 3e38 gate stay finite in float32.
    value = (torch.rand(len(GATES), generator=generator) * 0.5 + 0.25).to(dtype).to(DEVICE)
    value = value * torch.tensor([(-1.0) ** i for i in range(len(GATES))], dtype=dtype, device=DEVICE)
    grad_out = (torch.rand(len(GATES), generator=generator) * 0.5 + 0.5).to(dtype).to(DEVICE)
    x = torch.cat([value, gate]).view(1, -1).requires_grad_(True)

    with fastvision.use_backend(backend):
        out = geglu(x, approximate)
        (dx,) = torch.autograd.grad(out, x, grad_out.view(1, -1))

    gelu, dgelu = _gelu_truth(gate, approximate)
    v, go = value.double(), grad_out.double()
    assert not out.isnan().any(), out
    assert not dx.isnan().any(), dx
    _close(out[0], v * gelu, dtype)
    _close(dx[0, : len(GATES)], go * gelu, dtype)
    _close(dx[0, len(GATES) :], go * v * dgelu, dtype)
    # The very negative gates give exactly zero (not -18 or -5414, as a clamped exponent would).
    negative = gate < -50
    assert (out[0][negative] == 0).all(), out[0][negative]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_nan_only_from_nan_or_infinite_value(backend, approximate):
    gate = torch.tensor([-math.inf, -math.inf, math.nan, 2.0, -1e36], device=DEVICE)
    value = torch.tensor([1.0, math.inf, 1.0, math.nan, math.inf], device=DEVICE)
    with fastvision.use_backend(backend):
        out = geglu(torch.cat([value, gate]).view(1, -1), approximate)[0]
    assert out[0] == 0
    assert out[1:4].isnan().all(), out  # inf * 0, a NaN gate, a NaN value
    assert out[4].isnan(), out  # inf * gelu(-1e36) = inf * 0


def _add_layer_norm_truth(x, residual, weight, bias, eps):
    s = x.double() + residual.double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    out = (s - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [7, 256, 5000])
@pytest.mark.parametrize("magnitude", [1e19, 1e20, 3e25])
def test_add_layer_norm_huge_rows_stay_finite_and_exact(backend, dim, magnitude):
    generator = torch.Generator().manual_seed(dim)
    x = (torch.randn(3, dim, generator=generator) * magnitude).to(DEVICE)
    residual = (torch.randn(3, dim, generator=generator) * magnitude / 3).to(DEVICE)
    residual[1] += magnitude  # an offset row: mean far from 0
    weight = torch.randn(dim, generator=generator).to(DEVICE).requires_grad_(True)
    bias = torch.randn(dim, generator=generator).to(DEVICE).requires_grad_(True)
    x.requires_grad_(True)
    grad_out = torch.randn(3, dim, generator=generator).to(DEVICE)

    with fastvision.use_backend(backend):
        out = add_layer_norm(x, residual, weight, bias, 1e-5)
        dx, dweight, dbias = torch.autograd.grad(out, (x, weight, bias), grad_out)

    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    expected = _add_layer_norm_truth(x64, residual.double(), w64, b64, 1e-5)
    edx, edweight, edbias = torch.autograd.grad(expected, (x64, w64, b64), grad_out.double())

    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), expected.detach().cpu(), atol=1e-4, rtol=1e-4)
    # Not the collapse to bias of an overflowing variance.
    assert (out - bias).abs().amax() > 0.1
    scale = edx.abs().amax().item()
    torch.testing.assert_close(dx.double().cpu(), edx.cpu(), atol=1e-4 * scale, rtol=1e-3)
    torch.testing.assert_close(dweight.double().cpu(), edweight.cpu(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dbias.double().cpu(), edbias.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [10, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_layer_norm_rows_of_identical_values_are_exactly_zero(backend, dim, dtype):
    values = [1000.1, -3.3e4, 0.1, 7.77, 12345.6789]
    x = torch.tensor(values, dtype=torch.float32).view(-1, 1).expand(-1, dim).to(dtype).to(DEVICE)
    residual = torch.full_like(x, 0.3)
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    with fastvision.use_backend(backend):
        out = add_layer_norm(x.contiguous(), residual, weight, None, 1e-5)
        out_with_bias = add_layer_norm(x.contiguous(), residual, weight, weight, 1e-5)
    assert torch.equal(out, torch.zeros_like(out)), out.abs().amax()
    assert torch.equal(out_with_bias, weight.expand_as(out)), (out_with_bias - weight).abs().amax()
