"""grn: what the shared harness does not cover — ConvNeXt V2's own formulation, the mask, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision.ops import OPS, grn, grn_reference

BACKENDS = backend_params(OPS["grn"].backends)


def _convnext_v2_grn(x, gamma, beta, eps=1e-6):
    """GRN as ConvNeXt V2 writes it (channels-last, parameters [1, 1, 1, C])."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return gamma * (x * nx) + beta + x


def _random(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_convnext_v2(backend):
    x = _random((2, 7, 5, 12), 1)
    gamma, beta = _random((1, 1, 1, 12), 2), _random((1, 1, 1, 12), 3)
    with fastvision.use_backend(backend):
        out = grn(x, gamma, beta)
    assert_close(out, _convnext_v2_grn(x.double(), gamma.double(), beta.double()), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_sites_do_not_count(backend):
    x, gamma, beta = _random((2, 4, 4, 6), 4), _random((6,), 5), _random((6,), 6)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool, device=DEVICE)
    mask[:, :2] = True
    changed = x.clone()
    changed[:, :2] = 100.0  # masked sites: any value, the statistics are unchanged
    with fastvision.use_backend(backend):
        a, b = grn(x, gamma, beta, mask=mask), grn(changed, gamma, beta, mask=mask)
    assert_close(a[:, 2:], b[:, 2:].double(), torch.float32)


def test_all_zero_sample_is_finite():
    x = torch.zeros(1, 3, 3, 4, device=DEVICE, requires_grad=True)
    out = grn_reference(x, torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE))
    out.sum().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.randn(2, 3, 4)}, ValueError, r"x must be channels-last \[B, H, W, C\]"),
        ({"gamma": torch.randn(5)}, ValueError, r"gamma must have shape \[4\]"),
        ({"beta": torch.randn(4, dtype=torch.float64)}, TypeError, "beta must have"),
        ({"eps": 0.0}, ValueError, "eps must be a positive"),
        ({"eps": float("inf")}, ValueError, "eps must be a positive"),
        ({"mask": torch.ones(2, 3, 3)}, TypeError, "mask must be a bool"),
        ({"mask": torch.ones(2, 3, 4, dtype=torch.bool)}, ValueError, r"mask must have shape"),
    ],
)
def test_rejects_bad_input(kwargs, error, match):
    args = {"x": torch.randn(2, 3, 3, 4), "gamma": torch.randn(4), "beta": torch.randn(4), **kwargs}
    with pytest.raises(error, match=match):
        grn(**args)
