"""selective_scan: what the shared harness does not cover — long sequences, the last state alone,
agreement with mamba-ssm's kernel when installed, and errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision.ops import OPS, selective_scan, selective_scan_reference

BACKENDS = backend_params(OPS["selective_scan"].backends)


def _inputs(batch=2, dim=8, length=40, state=16, seed=0, dtype=torch.float32, varying=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    u, delta, z = r(batch, dim, length), r(batch, dim, length, scale=0.5), r(batch, dim, length)
    u, delta = u.to(dtype), delta.to(dtype)
    A = -torch.rand(dim, state, generator=g).to(DEVICE) - 0.05
    bc = (batch, state, length) if varying else (dim, state)
    return u, delta, A, r(*bc).to(dtype), r(*bc).to(dtype), r(dim), z.to(dtype), r(dim, scale=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_with_gradients(backend):
    """L = 300 with decays near 1: errors would accumulate along the carried state."""
    u, delta, A, B, C, D, z, bias = _inputs(length=300, seed=1)
    A = A * 0.01
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, B, C)]
    with fastvision.use_backend(backend):
        out, last = selective_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], D, z, bias, True, True)
    ref_leaves = [t.double().requires_grad_(True) for t in (u, delta, B, C)]
    want, want_last = selective_scan_reference(*ref_leaves[:2], A.double(), *ref_leaves[2:], D.double(),
                                               z.double(), bias.double(), True, True)  # fmt: skip
    assert_close(out, want, torch.float32, scale=20)
    assert_close(last, want_last, torch.float32, scale=20)
    grads = torch.autograd.grad((out * z).sum() + last.sum(), leaves)
    want_grads = torch.autograd.grad((want * z.double()).sum() + want_last.sum(), ref_leaves)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected, torch.float32, scale=200)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_the_last_state_alone(backend):
    u, delta, A, B, C, *_ = _inputs(seed=2, varying=False)
    u.requires_grad_(True)
    with fastvision.use_backend(backend):
        _, last = selective_scan(u, delta, A, B, C, return_last_state=True)
        (grad,) = torch.autograd.grad(last.sum(), u)
    u64 = u.detach().double().requires_grad_(True)
    doubles = (t.double() for t in (delta, A, B, C))
    _, want = selective_scan_reference(u64, *doubles, return_last_state=True)
    (want_grad,) = torch.autograd.grad(want.sum(), u64)
    assert_close(grad, want_grad, torch.float32, scale=10)


@pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is None or DEVICE.type != "cuda",
    reason="mamba-ssm's CUDA selective scan is an optional peer (the 'mamba' extra on a CUDA machine)",
)
def test_agrees_with_mamba_ssm():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=16, length=128, seed=3)
    want = selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert_close(selective_scan(u, delta, A, B, C, D, z, bias, True), want.double(), torch.float32, scale=20)


def _bad(**changes):
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=4, length=5, state=3)
    args = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": bias}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"A": torch.complex(-torch.rand(4, 3), torch.rand(4, 3))}, TypeError, "A must be real"),
        ({"A": -torch.rand(4, 257)}, ValueError, r"N \(A.shape\[1\]\) must be in \[1, 256\]"),
        ({"A": -torch.rand(4, 3, dtype=torch.float64)}, TypeError, "A must be float32"),
        ({"delta": torch.rand(2, 4, 6)}, ValueError, "delta must have u's shape"),
        ({"B": torch.randn(2, 3, 3, 5)}, ValueError, "groups G = 3 must divide dim = 4"),
        ({"C": torch.randn(2, 3, 4)}, ValueError, r"C varying must have shape \[batch, N, L\]"),
        ({"D": torch.randn(4, dtype=torch.float16)}, TypeError, "D must be float32"),
        ({"delta_bias": torch.randn(5)}, ValueError, r"delta_bias must have shape \[dim\]"),
        ({"z": torch.randn(2, 4)}, ValueError, "z must have u's shape"),
        ({"u": torch.ones(2, 4, 5, dtype=torch.int64)}, TypeError, "u must have dtype"),
        ({"delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
    ],
)
def test_rejects_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        selective_scan(**_bad(**changes))
