"""Numerical edges of the ops, per backend INCLUDING the reference, against float64 or the exact limit.

* geglu: gates at and near +-inf (and where g^3 overflows float32) give the exact limits
  ``gelu(-inf) = 0``, ``gelu(+inf) = inf`` in forward and backward, in both GELU forms.
* add_layer_norm: rows whose ``x + residual`` nears 1e19-1e20 (float32 squares overflow) give the
  finite true result; rows of +-1e38 normalize to exactly +-1; rows of identical values to exactly 0.
* grn: a NaN or inf at a masked-out site changes nothing (the mask leaves the site out); an all-zero
  channel has finite gradients.
* topk_attention: identical keys follow the tie rule (lower index first); under
  ``torch.autocast(bfloat16)`` the attention references still compute in float32.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastvision
from fastvision.ops import (
    add_layer_norm,
    block_topk_attention_reference,
    geglu,
    grn,
    topk_attention_reference,
)
from tests.conftest import DEVICE, backend_params

BACKENDS = backend_params(("reference", "cpu", "triton"))
GRN_BACKENDS = backend_params(("reference", "triton"))
# The geglu reference's gate derivative is NaN at gates of 1e20 and up (tanh form) and at +inf (erf
# form), where the limit is 1 (the owner has been told; remove the mark when it lands).
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [8, 5000])
def test_add_layer_norm_rows_of_plus_minus_1e38_are_exactly_plus_minus_one(backend, dim):
    """The issue's reproducer: ``x = 1e38`` with every other entry ``-1e38``, residual 0: mean 0,
    variance 1e76 (past float32), so the exact result is ``sign(x)`` (eps is negligible)."""
    x = torch.full((3, dim), 1e38, device=DEVICE)
    x[:, ::2] = -1e38
    x[1] *= 3.0  # 3e38: near the float32 maximum
    x[2, 1::2] = 1e37  # an unbalanced row: mean far from 0, still exact in float64
    with fastvision.use_backend(backend):
        out = add_layer_norm(x, 0 * x)
    expected = _add_layer_norm_truth(x, 0 * x, None, None, 1e-5)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


def _grn_inputs(seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 6, 8, generator=generator).to(dtype).to(DEVICE)
    gamma = torch.randn(8, generator=generator).to(DEVICE)
    beta = torch.randn(8, generator=generator).to(DEVICE)
    mask = torch.rand(2, 5, 6, generator=generator) < 0.4
    return x, gamma, beta, mask.to(DEVICE)


@pytest.mark.parametrize("backend", GRN_BACKENDS)
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_grn_nan_or_inf_at_a_masked_site_changes_nothing(backend, poison):
    x, gamma, beta, mask = _grn_inputs(91)
    poisoned = x.clone()
    site = mask.nonzero()[0]
    poisoned[site[0], site[1], site[2]] = poison  # a masked-out site
    with fastvision.use_backend(backend):
        clean = grn(x, gamma, beta, 1e-6, mask)
        out = grn(poisoned, gamma, beta, 1e-6, mask)
    kept = ~mask
    assert torch.isfinite(out[kept]).all(), out[kept]
    torch.testing.assert_close(out[kept], clean[kept], atol=0, rtol=0)
    # Ground truth at the kept sites: the float64 reference with the masked site zeroed.
    truth = fastvision.ops.grn_reference(x.double(), gamma.double(), beta.double(), 1e-6, mask)
    torch.testing.assert_close(out[kept].double(), truth[kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", GRN_BACKENDS)
def test_grn_all_zero_channel_has_finite_gradients(backend):
    """The issue's reproducer: ``x = randn(1, 2, 2, 4); x[..., 1:] = 0``: channels 1-3 are all zero,
    Gx = 0 there; the gradients must be finite (sqrt's derivative at 0 would make them NaN)."""
    x = torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x[..., 1:] = 0
    x.requires_grad_(True)
    gamma = torch.randn(4, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_(True)
    beta = torch.randn(4, generator=torch.Generator().manual_seed(7)).to(DEVICE).requires_grad_(True)
    grad_out = torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with fastvision.use_backend(backend):
        out = grn(x, gamma, beta)
        grads = torch.autograd.grad(out, (x, gamma, beta), grad_out)
    for g in grads:
        assert torch.isfinite(g).all(), g
    assert torch.isfinite(out).all()


def test_topk_reference_tie_rule_for_identical_keys():
    """Identical keys have equal scores: among them the lower index is selected first. A matmul can
    round identical keys' scores differently (measured: D = 16, Nk = 7, Nq = 64 gives 170 such
    entries), which breaks the rule unless the selection sums each score in one order."""
    generator = torch.Generator().manual_seed(0)
    for head_dim, num_keys, num_queries, topk in ((16, 7, 64, 3), (32, 7, 5, 2), (128, 100, 9, 17)):
        q = torch.randn(2, 3, num_queries, head_dim, generator=generator)
        k = torch.randn(2, 3, num_keys, head_dim, generator=generator)
        k[:, :, 1::3] = k[:, :, :1]  # keys 0, 1, 4, 7, ... are identical
        # Identical keys with the same value: the output cannot tell them apart, so give each key a
        # distinct value and read the selection back from the output's dependence on v.
        v = torch.eye(num_keys, head_dim).expand(2, 3, num_keys, head_dim).contiguous()
        weights = topk_attention_reference(q, k, v, topk)  # [.., Nq, D]: the weight of key j at column j
        tied = [0, *range(1, num_keys, 3)]
        selected = (weights[..., tied] > 0).int()
        # The selected tied keys form a prefix of the tied keys in index order.
        assert (selected[..., 1:] <= selected[..., :-1]).all(), (head_dim, num_keys, num_queries, topk)


def _attention_case():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 2, 40, 32, generator=generator) for _ in range(3)]


@pytest.mark.parametrize(
    "reference, extra",
    [(topk_attention_reference, (8,)), (block_topk_attention_reference, (2, 16))],
    ids=["topk_attention", "block_topk_attention"],
)
def test_attention_references_keep_float32_under_autocast(reference, extra):
    q, k, v = _attention_case()
    plain = reference(q, k, v, *extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = reference(q, k, v, *extra)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=1e-6, rtol=1e-6)


def test_without_autocast_keeps_float32_math():
    """The contract's helper for those references: float32 inside a caller's autocast region."""
    contract = importlib.import_module("fastvision.ops._contract")
    q, k, v = _attention_case()

    def scores(q, k):
        return q @ k.transpose(-2, -1)

    plain = scores(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scores(q, k).dtype == torch.bfloat16
        kept = contract.without_autocast(scores)(q, k)
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, plain, atol=0, rtol=0)
