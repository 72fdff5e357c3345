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


# --- edge values (the reference included) and direct calls of the registered ops -------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_value_at_a_masked_site_is_left_out(backend, bad):
    """A masked site does not count: a NaN or inf there reaches only its own output, not Gx."""
    x, gamma, beta = _random((2, 3, 4, 5), 11), _random((5,), 12), _random((5,), 13)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 2] = mask[1, 0, 0] = True
    poisoned = x.clone()
    poisoned[0, 1, 2, 3] = bad
    with fastvision.use_backend(backend):
        out = grn(poisoned, gamma, beta, mask=mask)
        clean = grn(x, gamma, beta, mask=mask)
    others = torch.ones_like(out, dtype=torch.bool)
    others[0, 1, 2] = False  # the poisoned site's own outputs
    assert torch.isfinite(out[others]).all()
    torch.testing.assert_close(out[others], clean[others], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_channel_has_finite_gradients(backend):
    """Gx = 0 for an all-zero channel: d sqrt at 0 is inf in autograd, but no gradient flows there."""
    x = _random((1, 2, 2, 4), 14)
    x[..., 1:] = 0
    x = x.requires_grad_(True)
    gamma = _random((4,), 15).requires_grad_(True)
    beta = _random((4,), 16).requires_grad_(True)
    grad_out = _random((1, 2, 2, 4), 17)
    with fastvision.use_backend(backend):
        grads = torch.autograd.grad(grn(x, gamma, beta), [x, gamma, beta], grad_out)
    for grad in grads:
        assert torch.isfinite(grad).all(), grads
    # The zero channels pass the gradient through the residual term only: dx = g * (gamma * 0 + 1).
    torch.testing.assert_close(grads[0][..., 1:], grad_out[..., 1:], atol=1e-6, rtol=1e-6)
    x64 = x.detach().double().requires_grad_(True)
    reference = grn_reference(x64, gamma.double(), beta.double())
    (expected,) = torch.autograd.grad(reference, x64, grad_out.double())
    assert_close(grads[0], expected, torch.float32)


_CPU_KERNEL = pytest.mark.skipif(OPS["grn"].built("cpu") is not None, reason="no C++ grn kernel built")
_KERNEL_OPS = [
    pytest.param(
        "grn_triton",
        marks=pytest.mark.skipif(
            fastvision._backend.why_unusable("triton", DEVICE) is not None, reason="triton cannot run here"
        ),
        id="triton",
    ),
    pytest.param("grn", marks=_CPU_KERNEL, id="cpu"),
]


@pytest.mark.parametrize("prefix", _KERNEL_OPS)
def test_kernel_ops_check_their_inputs(prefix):
    device = DEVICE if prefix == "grn_triton" else torch.device("cpu")
    forward = getattr(torch.ops.fastvision, f"{prefix}_forward")
    backward = getattr(torch.ops.fastvision, f"{prefix}_backward")
    x, gamma, beta = (
        _random(shape, seed).to(device) for shape, seed in [((2, 3, 4, 5), 18), (5, 19), (5, 20)]
    )
    no_mask = torch.empty(0, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="gamma must have shape"):
        forward(x, gamma[:3], beta, no_mask, 1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        forward(x, gamma, beta, torch.ones(2, 3, dtype=torch.bool, device=device), 1e-6)
    with pytest.raises(ValueError, match="eps must be a positive"):
        forward(x, gamma, beta, no_mask, -1.0)
    with pytest.raises(ValueError, match=r"beta must have shape \[5\]"):  # the public op reshapes it
        forward(x, gamma, beta.view(1, 1, 1, 5), no_mask, 1e-6)
    with pytest.raises(TypeError, match="mask must be"):
        forward(x, gamma, beta, torch.ones(2, 3, 4, device=device), 1e-6)
    with pytest.raises(ValueError, match="grad_out must be"):
        backward(x[:1], x, gamma, beta, no_mask, 1e-6)


# --- the Triton kernels' two paths: one pass per sample, and the deterministic two-pass fallback ------

_TRITON = pytest.mark.skipif(
    fastvision._backend.why_unusable("triton", DEVICE) is not None, reason="triton cannot run here"
)


def _reference_grads(x, gamma, beta, mask, grad_out, eps=1e-6):
    x64, gamma64, beta64 = (t.detach().double().requires_grad_(True) for t in (x, gamma, beta))
    out = grn_reference(x64, gamma64, beta64, eps, mask)
    return (out, *torch.autograd.grad(out, [x64, gamma64, beta64], grad_out.double()))


@_TRITON
@pytest.mark.parametrize("fused", [True, False], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize(
    "shape, masked, strided",
    [
        ((3, 5, 7, 1), False, ""),  # C = 1
        ((2, 3, 3, 2), True, ""),  # C = 2
        ((2, 7, 5, 96), True, "sites"),  # a window of a wider x: stride_h != W * stride_w
        ((3, 4, 9, 131), False, "channels"),  # C not a power of two, above one channel block
        ((1, 1, 1, 5), True, ""),  # one site
    ],
)
def test_triton_paths_match_the_reference(fused, shape, masked, strided):
    """Forward and backward of each path against float64, odd sizes, with and without a mask."""
    from fastvision.triton_kernels.grn import grn_backward, grn_forward

    seed = sum(shape) + 7 * masked + 13 * len(strided)
    batch, height, width, channels = shape
    if strided == "channels":
        x = _random((batch, height, width, 2 * channels), seed)[..., ::2]
    elif strided == "sites":
        x = _random((batch, height, width + 3, channels), seed)[:, :, 1 : width + 1]
    else:
        x = _random(shape, seed)
    gamma, beta = _random((channels,), seed + 1), _random((channels,), seed + 2)
    grad_out = _random(shape, seed + 3)
    mask = torch.rand(shape[:3], generator=torch.Generator().manual_seed(seed)).to(DEVICE) < 0.4
    mask = mask if masked else None
    kernel_mask = mask if masked else torch.empty(0, dtype=torch.bool, device=DEVICE)
    out = grn_forward(x, gamma, beta, kernel_mask, 1e-6, fused=fused)
    dx, dgamma, dbeta = grn_backward(grad_out, x, gamma, beta, kernel_mask, 1e-6, fused=fused)
    expected, *grads = _reference_grads(x, gamma, beta, mask, grad_out)
    assert_close(out, expected, torch.float32)
    for got, want in zip((dx, dgamma, dbeta), grads, strict=True):
        assert_close(got, want, torch.float32)


@_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paths_agree_in_half_precision(dtype):
    from fastvision.triton_kernels.grn import grn_backward, grn_forward

    x = _random((2, 6, 5, 40), 31, dtype)
    gamma, beta = _random((40,), 32, dtype), _random((40,), 33, dtype)
    grad_out = _random((2, 6, 5, 40), 34, dtype)
    no_mask = torch.empty(0, dtype=torch.bool, device=DEVICE)
    expected, *grads = _reference_grads(x, gamma, beta, None, grad_out)
    for fused in (True, False):
        assert_close(grn_forward(x, gamma, beta, no_mask, 1e-6, fused=fused), expected, dtype)
        for got, want in zip(
            grn_backward(grad_out, x, gamma, beta, no_mask, 1e-6, fused=fused), grads, strict=True
        ):
            assert_close(got, want, dtype if got.dtype == dtype else torch.float32)


@_TRITON
@pytest.mark.parametrize("fused", [True, False], ids=["one_pass", "two_pass"])
def test_triton_is_bit_identical_run_to_run(fused):
    """No float atomics: the same inputs give the same bits, forward and backward, on every run."""
    from fastvision.triton_kernels.grn import grn_backward, grn_forward

    x, gamma, beta = _random((4, 9, 11, 24), 41), _random((24,), 42), _random((24,), 43)
    grad_out = _random((4, 9, 11, 24), 44)
    mask = torch.rand(4, 9, 11, generator=torch.Generator().manual_seed(45)).to(DEVICE) < 0.3
    runs = [
        (grn_forward(x, gamma, beta, mask, 1e-6, fused=fused),
         *grn_backward(grad_out, x, gamma, beta, mask, 1e-6, fused=fused))
        for _ in range(2)
    ]  # fmt: skip
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@_TRITON
def test_public_op_is_bit_identical_run_to_run():
    x = _random((3, 5, 6, 12), 51).requires_grad_(True)
    gamma = _random((12,), 52).requires_grad_(True)
    beta = _random((12,), 53).requires_grad_(True)
    grad_out = _random((3, 5, 6, 12), 54)
    runs = []
    with fastvision.use_backend("triton"):
        for _ in range(2):
            out = grn(x, gamma, beta)
            runs.append((out.detach(), *torch.autograd.grad(out, [x, gamma, beta], grad_out)))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_one_pass_choice():
    from fastvision.triton_kernels.grn import MAX_FUSED_C, ONE_PASS_L2_BYTES, one_pass

    assert one_pass(256, 7 * 7, 768, 2, backward=True)  # ConvNeXt V2's last stage
    assert one_pass(256, 14 * 14, 384, 2, backward=False)  # 38.5 MB in L2 at once
    assert not one_pass(256, 14 * 14, 384, 2, backward=True)  # x and g: 77 MB
    assert not one_pass(256, 56 * 56, 96, 2, backward=False)  # 154 MB: two passes
    assert not one_pass(4, 4, MAX_FUSED_C + 1, 4, backward=False)
    per_sample = ONE_PASS_L2_BYTES // 528  # 4 programs on each of 132 SMs
    assert one_pass(10_000, per_sample // 16, 2, 4, backward=True)
    assert not one_pass(10_000, per_sample // 16 + 1, 2, 4, backward=True)


# --- the C++ CPU kernel: blocks of 64 sites, partial sums added in block order ----------------------


def _cpu_inputs(shape, seed, strided="", dtype=torch.float32):
    batch, height, width, channels = shape
    generator = torch.Generator().manual_seed(seed)
    if strided == "channels":
        x = torch.randn(batch, height, width, 2 * channels, generator=generator)[..., ::2]
    elif strided == "sites":
        x = torch.randn(batch, height, width + 3, channels, generator=generator)[:, :, 1 : width + 1]
    elif strided == "nchw":
        x = torch.randn(batch, channels, height, width, generator=generator).permute(0, 2, 3, 1)
    else:
        x = torch.randn(shape, generator=generator)
    gamma, beta, grad_out = (torch.randn(n, generator=generator) for n in ((channels,), (channels,), shape))
    mask = torch.rand(shape[:3], generator=generator) < 0.4
    return x.to(dtype), gamma.to(dtype), beta.to(dtype), mask, grad_out.to(dtype)


@_CPU_KERNEL
@pytest.mark.parametrize(
    "shape, masked, strided",
    [
        ((3, 5, 7, 1), False, ""),  # C = 1, 35 sites: one block
        ((2, 3, 3, 2), True, ""),  # C = 2
        ((2, 9, 11, 24), True, ""),  # 99 sites: two blocks, the second partial
        ((2, 7, 5, 96), True, "sites"),  # stride_h != W * stride_w
        ((3, 4, 9, 131), False, "channels"),  # channel stride 2, C not a multiple of the vector width
        ((2, 13, 11, 17), True, "nchw"),  # an NCHW tensor viewed channels-last
        ((1, 1, 1, 5), True, ""),  # one site
    ],
)
def test_cpu_kernel_matches_the_reference(shape, masked, strided):
    """The kernel ops themselves, forward and backward, against float64 on odd sizes and strides."""
    x, gamma, beta, mask, grad_out = _cpu_inputs(shape, sum(shape) + 7 * masked, strided)
    mask = mask if masked else None
    kernel_mask = mask if masked else torch.empty(0, dtype=torch.bool)
    out = torch.ops.fastvision.grn_forward(x, gamma, beta, kernel_mask, 1e-6)
    grads = torch.ops.fastvision.grn_backward(grad_out, x, gamma, beta, kernel_mask, 1e-6)
    expected, *expected_grads = _reference_grads(x, gamma, beta, mask, grad_out)
    assert out.is_contiguous() and out.dtype == x.dtype
    assert_close(out, expected, torch.float32)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, torch.float32)


@_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_in_half_precision(dtype):
    x, gamma, beta, mask, grad_out = _cpu_inputs((2, 9, 8, 40), 61, dtype=dtype)
    out = torch.ops.fastvision.grn_forward(x, gamma, beta, mask, 1e-6)
    dx, dgamma, dbeta = torch.ops.fastvision.grn_backward(grad_out, x, gamma, beta, mask, 1e-6)
    expected, *grads = _reference_grads(x, gamma, beta, mask, grad_out)
    assert out.dtype == dx.dtype == dtype and dgamma.dtype == dbeta.dtype == torch.float32
    assert_close(out, expected, dtype)
    assert_close(dx, grads[0], dtype)
    for got, want in zip((dgamma, dbeta), grads[1:], strict=True):
        assert_close(got, want, dtype, scale=4.0)  # sums over 144 sites of 16-bit products


@_CPU_KERNEL
def test_cpu_kernel_is_bit_identical_for_any_thread_count():
    """Per-block partials added in block order: 1 and 2 threads, and two runs, give the same bits."""
    x, gamma, beta, mask, grad_out = _cpu_inputs((3, 17, 19, 24), 71)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            out = torch.ops.fastvision.grn_forward(x, gamma, beta, mask, 1e-6)
            runs.append((out, *torch.ops.fastvision.grn_backward(grad_out, x, gamma, beta, mask, 1e-6)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for first, other in zip(runs[0], run, strict=True):
            assert torch.equal(first, other)


@_CPU_KERNEL
def test_cpu_kernel_on_empty_inputs():
    for shape in ((0, 3, 3, 4), (2, 0, 3, 4), (2, 3, 3, 0)):
        x = torch.randn(shape)
        gamma, beta = torch.randn(shape[3]), torch.randn(shape[3])
        no_mask = torch.empty(0, dtype=torch.bool)
        assert torch.ops.fastvision.grn_forward(x, gamma, beta, no_mask, 1e-6).shape == shape
        grad_out = torch.randn(shape)
        dx, dgamma, dbeta = torch.ops.fastvision.grn_backward(grad_out, x, gamma, beta, no_mask, 1e-6)
        assert dx.shape == shape and not dgamma.any() and not dbeta.any()
