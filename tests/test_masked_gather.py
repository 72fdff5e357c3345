"""masked_gather: what the shared harness does not cover — truncation, the loop baseline, poisoned
outputs, sync-free slots on a GPU, and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastvision
from fastvision.ops import OPS, masked_gather, masked_gather_reference
from fastvision.ops.masked_gather import masked_gather_loop_reference

BACKENDS = backend_params(OPS["masked_gather"].backends)


def _inputs(batch, channels, height, width, ratio, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, height, width, generator=generator) < ratio
    x = torch.randn(batch, channels, height, width, generator=generator).to(dtype)
    return x.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_count", [None, 0, 1, 7, 200])
def test_matches_the_loop_exactly(backend, max_count):
    x, mask = _inputs(5, 6, 9, 7, 0.6, seed=1)
    mask[2] = False  # a sample with no site
    mask[3] = True  # a sample with every site
    with fastvision.use_backend(backend):
        got = masked_gather(x, mask, max_count)
    want = masked_gather_loop_reference(x, mask, max_count)
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "one_channel"])
def test_any_layout_gathers_and_backpropagates_exactly(backend, layout):
    """Channels-last x (lanes along channels), a sliced NCHW view (lanes along slots) and one channel,
    over two channel tiles; the gradient lands at the sites only, every other element 0."""
    channels = 1 if layout == "one_channel" else 70
    x, mask = _inputs(3, channels, 11, 13, 0.6, seed=4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[..., ::2]
    leaf = x.detach().requires_grad_(True)
    with fastvision.use_backend(backend):
        got = masked_gather(leaf, mask, 90)
    want = masked_gather_loop_reference(x, mask, 90)
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert torch.equal(a, b), name
    grad_values = torch.randn(got.values.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (grad,) = torch.autograd.grad(got.values, leaf, grad_values)
    want_grad = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for m in range(int(want.valid[b].sum())):
            h, w = want.indices[b, m].tolist()
            want_grad[b, :, h, w] = grad_values[b, m]
    assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_shows_in_counts(backend):
    x, mask = _inputs(3, 2, 5, 5, 0.7, seed=2)
    with fastvision.use_backend(backend):
        out = masked_gather(x, mask, max_count=4)
    counts = mask.flatten(1).sum(1)
    assert torch.equal(out.counts, counts) and (out.counts > 4).all()
    assert out.values.shape == (3, 4, 2) and out.valid.all()
    first = mask[0].nonzero()[:4]
    assert torch.equal(out.indices[0], first)
    assert torch.equal(out.values[0], x[0, :, first[:, 0], first[:, 1]].t())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "triton"])
def test_triton_writes_every_output(backend):
    """Every slot of every output is written, padding included: the launchers allocate with
    torch.empty, so unwritten memory would show as a mismatch on freshly poisoned memory."""
    from fastvision.triton_kernels.masked_gather import masked_gather_forward

    x, mask = _inputs(4, 3, 6, 6, 0.3, seed=3)
    torch.empty(1 << 20, device=DEVICE).fill_(float("nan"))  # poison the caching allocator's pool
    values, sites, valid, counts = masked_gather_forward(x, mask, 20)
    want = masked_gather_reference(x, mask, 20)
    assert torch.equal(values, want.values) and torch.equal(valid, want.valid)
    assert torch.equal(counts, want.counts)
    assert (sites[~valid] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_lands_at_the_sites_only(backend):
    x, mask = _inputs(2, 3, 4, 5, 0.5, seed=4)
    x.requires_grad_(True)
    with fastvision.use_backend(backend):
        out = masked_gather(x, mask, max_count=6)
        out.values.sum().backward()
    expected = torch.zeros_like(x)
    for b in range(2):
        for h, w in mask[b].nonzero()[:6].tolist():
            expected[b, :, h, w] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronization is a CUDA notion")
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_max_count_path_never_synchronizes(backend):
    x, mask = _inputs(8, 16, 32, 32, 0.6, seed=5)
    x.requires_grad_(True)
    with fastvision.use_backend(backend):
        masked_gather(x, mask, max_count=700)  # warm up (compilation may synchronize)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = masked_gather(x, mask, max_count=700)
            out.values.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


X = torch.randn(2, 3, 4, 4)
MASK = torch.ones(2, 4, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((X, torch.ones(2, 4, 4)), TypeError, "mask must be a bool tensor"),
        ((X, torch.ones(2, 4, 5, dtype=torch.bool)), ValueError, r"mask must have shape"),
        ((torch.randn(3, 4, 4), torch.ones(3, 4, 4, dtype=torch.bool)), ValueError, r"x must have shape"),
        ((X, MASK, -1), ValueError, "max_count must be"),
        ((X, MASK, 2.5), TypeError, "max_count must be"),
        ((X, MASK, 2**63), ValueError, "max_count must be"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int32), MASK), TypeError, "x must"),
        ((X, MASK.to("meta")), ValueError, "device"),
    ],
)
def test_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        masked_gather(*args)


def _registered_backward_ops():
    ops = []
    if OPS["masked_gather"].built("cpu") is None:
        ops.append(pytest.param(torch.ops.fastvision.masked_gather_backward, id="cpp"))
    return ops


@pytest.mark.parametrize("op", _registered_backward_ops())
@pytest.mark.parametrize("bad", [2**40, -7, -2, 20])  # H * W = 20
def test_registered_backward_refuses_out_of_range_sites(op, bad):
    """A direct call of the C++ backward op with a site outside [0, H * W) (other than the -1 of an
    empty slot) is refused, naming the argument, the valid range and the entry."""
    grad = torch.randn(2, 3, 4, device=DEVICE)
    sites = torch.tensor([[0, 2, 5], [-1, 19, bad]], device=DEVICE)
    with pytest.raises(ValueError, match=r"sites must hold indices in \[0, H \* W\) = \[0, 20\) or -1"):
        op(grad, sites, 4, 5)
    with pytest.raises(ValueError, match=rf"got {bad} at \[1, 2\]"):
        op(grad, sites, 4, 5)


@pytest.mark.parametrize("op", _registered_backward_ops())
def test_registered_backward_takes_in_range_sites(op):
    """Sites in range and -1 slots: each valid slot's gradient lands at its site, the rest is zero."""
    grad = torch.randn(2, 3, 4, device=DEVICE)
    sites = torch.tensor([[0, -1, 5], [-1, 19, -1]], device=DEVICE)
    out = op(grad, sites, 4, 5)
    expected = torch.zeros(2, 4, 4, 5, device=DEVICE)
    expected[0, :, 0, 0] = grad[0, 0]
    expected[0, :, 1, 0] = grad[0, 2]
    expected[1, :, 3, 4] = grad[1, 1]
    assert torch.equal(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the sync count of the CUDA backward)")
@pytest.mark.skipif(OPS["masked_gather"].built("cuda") is not None, reason="the CUDA kernels are not built")
def test_public_cuda_backward_skips_the_synchronizing_site_check():
    """The public op's backward passes its forward's own sites: no host sync for a range check (with
    max_count given, forward and backward are sync-free); a direct call still checks."""
    x, mask = _inputs(2, 3, 4, 5, 0.5, seed=8)
    x = x.cuda().requires_grad_(True)
    mask = mask.cuda()
    with fastvision.use_backend("cuda"):
        out = masked_gather(x, mask, 20)
        grad = torch.randn_like(out.values)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            (gx,) = torch.autograd.grad(out.values, x, grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert gx.shape == x.shape
    sites = torch.tensor([[0, 2, 5], [-1, 19, 20]], device="cuda")
    with pytest.raises(ValueError, match="sites must hold indices"):
        torch.ops.fastvision.masked_gather_backward(torch.randn(2, 3, 3, device="cuda"), sites, 4, 5)


@pytest.mark.skipif(
    fastvision._backend.why_unusable("triton", DEVICE) is not None, reason="triton cannot run here"
)
def test_registered_triton_backward_refuses_out_of_range_sites():
    """A direct call of the Triton backward op with sites outside [0, H * W) (other than -1) is
    refused; the public op's backward passes its forward's own sites and pays no check."""
    grad = torch.randn(2, 3, 4, device=DEVICE)
    for bad in (2**40, -7, 20):  # H * W = 20
        sites = torch.tensor([[0, bad, 5], [-1, 19, 3]], device=DEVICE)
        with pytest.raises(ValueError, match="sites must hold indices"):
            torch.ops.fastvision.masked_gather_triton_backward(grad, sites, 4, 5)


@pytest.mark.skipif(
    fastvision._backend.why_unusable("triton", DEVICE) is not None, reason="triton cannot run here"
)
def test_triton_ops_check_their_inputs():
    x, mask = _inputs(2, 3, 4, 5, 0.5, seed=6)
    with pytest.raises(ValueError, match="mask must have shape"):
        torch.ops.fastvision.masked_gather_triton_forward(x, mask[:, :3], 4)
    with pytest.raises(ValueError, match="max_count must be"):
        torch.ops.fastvision.masked_gather_triton_forward(x, mask, -1)
    grad = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="sites must be int64 of shape"):
        torch.ops.fastvision.masked_gather_triton_backward(grad, torch.zeros(2, 2, dtype=torch.int64), 4, 5)
    with pytest.raises(ValueError, match="height must be a non-negative"):
        torch.ops.fastvision.masked_gather_triton_backward(grad, torch.zeros(2, 3, dtype=torch.int64), -4, 5)
