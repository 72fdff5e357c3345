"""SparseTensor, kernel maps, submanifold sparse conv (vs the dense definition), modules, sparse U-Net."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision._backend import BackendUnavailableError, why_unusable
from fastvision.ops import OPS
from fastvision.ops.sparse_conv2d import (
    dense_weight,
    sparse_conv2d,
    sparse_conv2d_reference,
    sparse_weight,
)
from fastvision.sparse import KernelMap, SparseTensor, build_kernel_map, coords_to_keys
from fastvision.sparse.kernel_map import brute_force_kernel_map

BACKENDS = backend_params(OPS["sparse_conv2d"].backends)
HAS_MAX_POOL = importlib.util.find_spec("fastvision.ops.sparse_max_pool2d") is not None
needs_max_pool = pytest.mark.skipif(
    not HAS_MAX_POOL, reason="fastvision.ops.sparse_max_pool2d is not present"
)


def _random_sparse_dense(shape, density, seed, dtype=torch.float32, device=DEVICE):
    """``[B, C, H, W]`` random values at a random ``density`` of sites, exact zeros elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    values = torch.randn(shape, generator=generator)
    values = torch.where(values == 0, torch.ones_like(values), values)  # no accidental inactive site
    active = torch.rand((batch, 1, height, width), generator=generator) < density
    return (values * active).to(device=device, dtype=dtype)


def _random(shape, seed, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)


# --- SparseTensor -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (3, 2, 9, 4), (2, 5, 1, 13)], ids=str)
def test_from_dense_round_trip_and_canonical_order(shape):
    dense = _random_sparse_dense(shape, 0.4, seed=sum(shape))
    x = SparseTensor.from_dense(dense)
    assert x.coords.dtype == torch.int64 and x.coords.shape == (x.num_sites, 3)
    assert x.feats.shape == (x.num_sites, shape[1]) and x.feats.dtype == dense.dtype
    assert x.spatial_shape == shape[2:] and x.batch_size == shape[0]
    keys = coords_to_keys(x.coords, x.spatial_shape)
    assert bool((keys[1:] > keys[:-1]).all()), "coords must be sorted and unique"
    assert x.num_sites == int((dense != 0).any(1).sum())
    torch.testing.assert_close(x.to_dense(), dense, atol=0, rtol=0)
    SparseTensor(x.coords, x.feats, x.spatial_shape, x.batch_size)  # passes its own validation


def test_from_dense_keeps_sites_with_any_nonzero_channel():
    dense = torch.zeros(2, 3, 4, 4, device=DEVICE)
    dense[0, 2, 1, 3] = -1.5  # only the last channel nonzero
    dense[1, 0, 0, 0] = 2.0
    x = SparseTensor.from_dense(dense)
    assert x.coords.tolist() == [[0, 1, 3], [1, 0, 0]]
    assert x.feats.tolist() == [[0.0, 0.0, -1.5], [2.0, 0.0, 0.0]]


def test_empty_and_partly_empty_batches():
    empty = SparseTensor.from_dense(torch.zeros(3, 2, 6, 5, device=DEVICE))
    assert empty.num_sites == 0 and empty.feats.shape == (0, 2) and empty.batch_size == 3
    assert torch.equal(empty.to_dense(), torch.zeros(3, 2, 6, 5, device=DEVICE))
    km = empty.kernel_map(3)
    assert km.in_indices.numel() == 0 and km.offset_starts.tolist() == [0] * 10

    dense = _random_sparse_dense((3, 2, 6, 5), 0.5, seed=3)
    dense[1] = 0  # middle item has no active site
    x = SparseTensor.from_dense(dense)
    assert 1 not in x.coords[:, 0].tolist()
    torch.testing.assert_close(x.to_dense(), dense, atol=0, rtol=0)


def test_from_coords_sorts_and_merges_duplicates():
    coords = torch.tensor([[1, 2, 0], [0, 3, 1], [1, 2, 0], [0, 0, 2]], device=DEVICE)
    feats = _random((4, 2), seed=4)
    x = SparseTensor.from_coords(coords, feats, (4, 3), 2)
    assert x.coords.tolist() == [[0, 0, 2], [0, 3, 1], [1, 2, 0]]
    torch.testing.assert_close(x.feats, torch.stack([feats[3], feats[1], feats[0] + feats[2]]))


def test_to_dense_is_differentiable():
    x = SparseTensor.from_dense(_random_sparse_dense((2, 3, 5, 5), 0.5, seed=5))
    feats = x.feats.clone().requires_grad_(True)
    grad = _random((2, 3, 5, 5), seed=6)
    (x.replace_feats(feats).to_dense() * grad).sum().backward()
    expected = grad.permute(0, 2, 3, 1)[x.coords[:, 0], x.coords[:, 1], x.coords[:, 2]]
    torch.testing.assert_close(feats.grad, expected)


def test_replace_feats_shares_kernel_map_cache():
    x = SparseTensor.from_dense(_random_sparse_dense((2, 1, 8, 8), 0.5, seed=7))
    y = x.replace_feats(_random((x.num_sites, 4), seed=8))
    assert y.num_channels == 4 and y.coords is x.coords
    assert y.kernel_map(3) is x.kernel_map(3)
    assert x.kernel_map(3) is not x.kernel_map(5)
    assert x.kernel_map(3, dilation=2) is not x.kernel_map(3)
    other = SparseTensor.from_dense(x.to_dense())  # same sites, fresh tensor: its own cache
    assert other.kernel_map(3) is not x.kernel_map(3)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda c, f: SparseTensor(c.float(), f, (4, 4), 2), TypeError, "coords must have dtype"),
        (lambda c, f: SparseTensor(c[:, :2], f, (4, 4), 2), ValueError, r"coords must have shape \[N, 3\]"),
        (lambda c, f: SparseTensor(c, f[:-1], (4, 4), 2), ValueError, "feats must have shape"),
        (lambda c, f: SparseTensor(c, f.long(), (4, 4), 2), TypeError, "floating-point"),
        (lambda c, f: SparseTensor(c.flip(0), f, (4, 4), 2), ValueError, "sorted by"),
        (
            lambda c, f: SparseTensor(torch.cat([c, c[-1:]]), torch.cat([f, f[-1:]]), (4, 4), 2),
            ValueError,
            "unique",
        ),
        (lambda c, f: SparseTensor(c, f, (4, 3), 2), ValueError, r"x indices must lie in \[0, 3\)"),
        (lambda c, f: SparseTensor(c, f, (4, 4), 1), ValueError, r"batch indices must lie in \[0, 1\)"),
        (lambda c, f: SparseTensor(c, f, (4, 0), 2), ValueError, "spatial_shape"),
        (lambda c, f: SparseTensor(c, f, (4, 4), -1), ValueError, "batch_size"),
        (lambda c, f: SparseTensor(c, f, (4, 4), 2).replace_feats(f[:1]), ValueError, "active sites"),
        (lambda c, f: SparseTensor(c, f, (4, 4), 2).replace_feats(f.long()), TypeError, "floating-point"),
        (lambda c, f: SparseTensor(c, f, (4, 4), 2).kernel_map(2), ValueError, "odd"),
        (lambda c, f: SparseTensor.from_dense(f), ValueError, r"\[B, C, H, W\]"),
    ],
)
def test_sparse_tensor_errors(make, error, match):
    coords = torch.tensor([[0, 0, 1], [0, 2, 3], [1, 3, 3]], device=DEVICE)
    feats = _random((3, 2), seed=9)
    with pytest.raises(error, match=match):
        make(coords, feats)


@pytest.mark.skipif(importlib.util.find_spec("warpconvnet") is not None, reason="warpconvnet is installed")
def test_warpconvnet_conversion_without_warpconvnet_says_what_is_missing():
    x = SparseTensor.from_dense(_random_sparse_dense((1, 1, 4, 4), 0.5, seed=10))
    with pytest.raises(ImportError, match="warpconvnet"):
        x.to_warpconvnet()


# --- kernel maps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, density, kernel_size, dilation",
    [
        ((1, 1, 1, 1), 1.0, 3, 1),  # one site, all neighbours out of bounds
        ((2, 1, 6, 7), 0.5, 3, 1),
        ((3, 1, 5, 9), 0.3, 5, 1),
        ((2, 1, 8, 5), 0.6, 3, 2),
        ((1, 1, 4, 4), 1.0, 1, 1),
        ((2, 1, 3, 11), 0.9, 3, 1),  # neighbours across a row end must not wrap to the next row
    ],
    ids=str,
)
@pytest.mark.parametrize("lookup", ["grid", "search"])
def test_kernel_map_matches_brute_force(shape, density, kernel_size, dilation, lookup, monkeypatch):
    import fastvision.sparse.kernel_map as kernel_map_module

    monkeypatch.setattr(kernel_map_module, "_use_grid", lambda *_: lookup == "grid")
    x = SparseTensor.from_dense(_random_sparse_dense(shape, density, seed=sum(shape) + kernel_size))
    km = build_kernel_map(x.coords, x.spatial_shape, kernel_size, dilation)
    assert km.in_indices.dtype == km.out_indices.dtype == torch.int64
    assert km.num_offsets == kernel_size**2 and km.num_sites == x.num_sites
    expected = brute_force_kernel_map(x.coords.cpu(), x.spatial_shape, kernel_size, dilation)
    for offset in range(km.num_offsets):
        ins, outs = km.pairs(offset)
        pairs = list(zip(ins.tolist(), outs.tolist(), strict=True))
        assert len(pairs) == len(set(pairs))
        assert set(pairs) == expected[offset], f"offset {offset}"
    center_in, center_out = km.pairs(km.center)
    assert torch.equal(center_in, torch.arange(x.num_sites, device=DEVICE))
    assert torch.equal(center_out, center_in)


# --- sparse_conv2d against the dense definition ---------------------------------------------------

# (batch, Cin, Cout, H, W, kernel_size, density, dilation)
CONV_CASES = [
    (1, 1, 1, 5, 7, 3, 0.5, 1),  # C = 1
    (3, 4, 6, 9, 11, 3, 0.3, 1),  # batch > 1, odd sizes
    (2, 3, 5, 13, 6, 5, 0.2, 1),  # K = 5
    (2, 2, 3, 8, 8, 3, 0.4, 2),  # dilation 2
    (1, 3, 7, 6, 5, 1, 0.5, 1),  # 1x1
    (2, 16, 8, 10, 10, 3, 0.9, 1),  # nearly dense
    (2, 40, 36, 12, 13, 3, 0.6, 1),  # several row, channel and weight-gradient tiles
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _conv_inputs(case, dtype, seed):
    batch, cin, cout, height, width, kernel_size, density, dilation = case
    x = SparseTensor.from_dense(_random_sparse_dense((batch, cin, height, width), density, seed, dtype))
    scale = (cin * kernel_size * kernel_size) ** -0.5
    weight = _random((kernel_size * kernel_size, cin, cout), seed + 1, dtype, scale)
    bias = _random((cout,), seed + 2, dtype)
    return x, weight, bias, kernel_size, dilation


def _check_against_dense(x, weight, bias, kernel_size, dilation, backend, scale=1.0):
    dtype = x.dtype
    grad_out = _random((x.num_sites, weight.shape[2]), seed=99, dtype=dtype)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x.feats, weight, bias)]
    expected = sparse_conv2d_reference(x.replace_feats(leaves64[0]), leaves64[1], leaves64[2], dilation)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())

    leaves = [t.detach().clone().requires_grad_(True) for t in (x.feats, weight, bias)]
    with fastvision.use_backend(backend):
        out = sparse_conv2d(leaves[0], x.kernel_map(kernel_size, dilation), leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype if dtype != torch.float64 else torch.float32, scale)
    for grad, expected_grad, leaf in zip(grads, expected_grads, leaves, strict=True):
        assert grad.dtype == dtype and grad.shape == leaf.shape
        # Weight gradients sum over all sites: allow for the longer reduction.
        assert_close(grad, expected_grad, dtype if dtype != torch.float64 else torch.float32, scale * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_sparse_conv2d_matches_dense_reference(backend, dtype, case):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64 (test_triton_rejects_float64 checks the error)")
    x, weight, bias, kernel_size, dilation = _conv_inputs(case, dtype, seed=sum(case[:5]))
    # Half precision rounds each offset's GEMM output once before the float32 sum over offsets.
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 2.0 * kernel_size
    _check_against_dense(x, weight, bias, kernel_size, dilation, backend, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_conv2d_empty(backend):
    x = SparseTensor.from_dense(torch.zeros(2, 3, 5, 5, device=DEVICE))
    weight = _random((9, 3, 4), seed=12).requires_grad_(True)
    feats = x.feats.requires_grad_(True)
    with fastvision.use_backend(backend):
        out = sparse_conv2d(feats, x.kernel_map(3), weight)
        out.sum().backward()
    assert out.shape == (0, 4)
    assert feats.grad.shape == (0, 3)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_conv2d_non_contiguous_feats(backend):
    x, weight, bias, kernel_size, dilation = _conv_inputs((2, 6, 5, 7, 9, 3, 0.4, 1), torch.float32, seed=13)
    wide = _random((x.num_sites, 12), seed=14)
    x = x.replace_feats(wide[:, ::2])
    assert not x.feats.is_contiguous()
    _check_against_dense(x, weight, bias, kernel_size, dilation, backend)


def test_sparse_conv2d_gradcheck():
    x, weight, bias, _, _ = _conv_inputs((2, 2, 3, 5, 4, 3, 0.5, 1), torch.float64, seed=15)
    km = x.kernel_map(3)
    inputs = (x.feats.clone().requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda f, w, b: sparse_conv2d(f, km, w, b), inputs)


def test_weight_layout_round_trip():
    weight = _random((5, 3, 3, 3), seed=16)
    assert sparse_weight(weight).shape == (9, 3, 5)
    assert torch.equal(dense_weight(sparse_weight(weight)), weight)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda f, km, w: (f, km, w[:, :2]), ValueError, r"weight must have shape \[K\*K, Cin, Cout\]"),
        (lambda f, km, w: (f, km, w[:4]), ValueError, "weight must have shape"),
        (lambda f, km, w: (f[:-1], km, w), ValueError, "active sites"),
        (lambda f, km, w: (f.half(), km, w), TypeError, "weight must have feats' dtype"),
        (lambda f, km, w: (f.long(), km, w.long()), TypeError, "feats must have dtype"),
        (lambda f, km, w: (f, "map", w), TypeError, "kernel_map must be a KernelMap"),
        (lambda f, km, w: (f[None], km, w), ValueError, r"feats must have shape \[N, Cin\]"),
        (lambda f, km, w: (f, km, w, torch.zeros(3, device=DEVICE)), ValueError, "bias must be"),
    ],
)
def test_sparse_conv2d_errors(args, error, match):
    x, weight, _, _, _ = _conv_inputs((1, 3, 4, 6, 6, 3, 0.5, 1), torch.float32, seed=17)
    with pytest.raises(error, match=match):
        sparse_conv2d(*args(x.feats, x.kernel_map(3), weight))


def test_sparse_conv2d_forced_missing_backend_raises():
    x, weight, _, _, _ = _conv_inputs((1, 2, 2, 4, 4, 3, 0.5, 1), torch.float32, seed=18)
    with fastvision.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="sparse_conv2d"):
        sparse_conv2d(x.feats, x.kernel_map(3), weight)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
def test_triton_rejects_float64(backend):
    x, weight, _, _, _ = _conv_inputs((1, 2, 2, 4, 4, 3, 0.5, 1), torch.float64, seed=18)
    with fastvision.use_backend(backend), pytest.raises(BackendUnavailableError, match="triton backend"):
        sparse_conv2d(x.feats, x.kernel_map(3), weight)


@pytest.mark.skipif(why_unusable("triton", DEVICE) is not None, reason="triton cannot run here")
def test_triton_ops_refuse_other_dtypes():
    """A direct call of the Triton ops with data the kernels do not take names the argument."""
    x, weight, _, _, _ = _conv_inputs((1, 2, 2, 4, 4, 3, 0.5, 1), torch.float32, seed=18)
    feats, neighbors = x.feats, x.kernel_map(3).neighbors
    forward = torch.ops.fastvision.sparse_conv2d_triton_forward
    backward = torch.ops.fastvision.sparse_conv2d_triton_backward
    with pytest.raises(TypeError, match="feats must have dtype"):
        forward(feats.double(), neighbors, weight.double())
    with pytest.raises(TypeError, match="feats must have dtype"):
        forward(feats.to(torch.int32), neighbors, weight)
    with pytest.raises(TypeError, match="weight must have feats' dtype"):
        forward(feats, neighbors, weight.to(torch.int32))
    grad_out = forward(feats, neighbors, weight)
    with pytest.raises(TypeError, match="grad_out must have feats' dtype"):
        backward(grad_out.to(torch.int32), feats, neighbors, weight, True, True)


def test_opcheck_and_compile():
    x, weight, bias, _, _ = _conv_inputs((2, 3, 4, 7, 6, 3, 0.4, 1), torch.float32, seed=19)
    km = x.kernel_map(3)
    feats = x.feats.clone().requires_grad_(True)
    weight.requires_grad_(True)
    args = (feats, km.in_indices, km.out_indices, km.offset_starts, weight)
    torch.library.opcheck(torch.ops.fastvision.sparse_conv2d_gather_gemm.default, args)

    def conv(f, w, b):
        return sparse_conv2d(f, km, w, b)

    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feats, weight, bias), conv(feats, weight, bias))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
def test_opcheck_triton(backend):
    x, weight, _, _, _ = _conv_inputs((2, 3, 4, 7, 6, 3, 0.4, 1), torch.float32, seed=21)
    km = x.kernel_map(3)
    args = (x.feats.clone().requires_grad_(True), km.neighbors, weight.requires_grad_(True))
    torch.library.opcheck(torch.ops.fastvision.sparse_conv2d_triton_forward.default, args)


def test_export():
    x, weight, bias, _, _ = _conv_inputs((2, 3, 4, 7, 6, 3, 0.4, 1), torch.float32, seed=20)
    km = x.kernel_map(3)

    class Conv(torch.nn.Module):
        def forward(self, feats, in_indices, out_indices, offset_starts, neighbors):
            kernel_map = KernelMap(in_indices, out_indices, offset_starts, 3, 1, feats.shape[0], neighbors)
            return sparse_conv2d(feats, kernel_map, weight, bias)

    args = (x.feats, km.in_indices, km.out_indices, km.offset_starts, km.neighbors)
    exported = torch.export.export(Conv(), args)
    torch.testing.assert_close(exported.module()(*args), Conv()(*args))


# --- modules ------------------------------------------------------------------------------------------


def _masked_dense_conv(conv, dense, mask):
    """The dense equivalent of a submanifold conv: nn.Conv2d, then zero the inactive sites."""
    weight = dense_weight(conv.weight)
    pad = (conv.kernel_size // 2) * conv.dilation
    return F.conv2d(dense, weight, conv.bias, padding=pad, dilation=conv.dilation) * mask


def test_sparse_conv2d_module_matches_masked_dense_conv():
    from fastvision.nn.sparse import SparseConv2d

    torch.manual_seed(0)
    conv = SparseConv2d(3, 5, kernel_size=3).to(DEVICE)
    bound = (3 * 9) ** -0.5
    assert conv.weight.shape == (9, 3, 5) and conv.weight.abs().max() <= bound
    assert conv.bias.abs().max() <= bound and conv.weight.std() > bound / 4
    dense = _random_sparse_dense((2, 3, 9, 10), 0.3, seed=21)
    mask = (dense != 0).any(1, keepdim=True)
    out = conv(SparseTensor.from_dense(dense))
    assert isinstance(out, SparseTensor) and out.num_channels == 5
    torch.testing.assert_close(out.to_dense(), _masked_dense_conv(conv, dense, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="SparseTensor"):
        conv(dense)


def test_residual_sparse_block_matches_masked_dense():
    from fastvision.nn.sparse import ResidualSparseBlock

    torch.manual_seed(1)
    dense = _random_sparse_dense((2, 3, 8, 9), 0.35, seed=22)
    mask = (dense != 0).any(1, keepdim=True)
    for block in (ResidualSparseBlock(3, 6), ResidualSparseBlock(3, 3)):
        block = block.to(DEVICE)
        out = block(SparseTensor.from_dense(dense))
        hidden = F.relu(_masked_dense_conv(block.conv1, dense, mask))
        hidden = _masked_dense_conv(block.conv2, hidden, mask)
        residual = dense if block.shortcut is None else _masked_dense_conv(block.shortcut, dense, mask)
        torch.testing.assert_close(out.to_dense(), F.relu(hidden + residual), atol=1e-5, rtol=1e-5)
        assert torch.equal(out.coords, SparseTensor.from_dense(dense).coords)


@needs_max_pool
def test_sparse_max_pool_module_matches_dense_pool():
    from fastvision.nn.sparse import SparseMaxPool2d

    dense = _random_sparse_dense((3, 4, 28, 28), 0.1, seed=23).abs()  # non-negative, as after a ReLU
    out = SparseMaxPool2d(2)(SparseTensor.from_dense(dense))
    assert out.spatial_shape == (14, 14) and out.batch_size == 3
    active = F.max_pool2d((dense != 0).any(1, keepdim=True).float(), 2)[:, 0].nonzero()
    assert torch.equal(out.coords, active)
    torch.testing.assert_close(out.to_dense(), F.max_pool2d(dense, 2))


# --- the sparse U-Net ---------------------------------------------------------------------------------


def _digit_batch(count):
    from fastvision.data import load_embedded_digits

    dataset = load_embedded_digits("train")
    images, labels = zip(*(dataset[i] for i in range(count)), strict=True)
    return torch.stack(images).to(DEVICE), torch.stack(labels).to(DEVICE)


@needs_max_pool
def test_sparse_unet_forward_backward_and_registry():
    from fastvision.models.registry import create_model, get_model_spec
    from fastvision.models.sparse_unet_mnist import sparse_unet_mnist  # noqa: F401 (registers)

    spec = get_model_spec("sparse_unet_mnist")
    assert spec.task == "classification" and spec.dataset == "mnist"
    torch.manual_seed(2)
    model = create_model("sparse_unet_mnist").to(DEVICE)
    images, _ = _digit_batch(4)
    assert (images == 0).float().mean() > 0.2, "expects an exactly-zero background"
    images[3] = 0  # an image with no active pixel at all
    log_probs = model(images)
    assert log_probs.shape == (4, 10)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(4, device=DEVICE))
    log_probs.mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.enc1.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        model(images[:, :, :27])


@needs_max_pool
def test_sparse_unet_training_steps_lower_the_loss():
    from fastvision.models.sparse_unet_mnist import SparseUNetMNIST

    torch.manual_seed(3)
    model = SparseUNetMNIST().to(DEVICE)
    images, labels = _digit_batch(6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = F.nll_loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_kernel_maps_refuse_tracing_with_a_clear_error():
    from fastvision.nn.sparse import SparseConv2d

    class SparseLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SparseConv2d(1, 4)

        def forward(self, images):
            return self.conv(SparseTensor.from_dense(images)).to_dense()

    module = SparseLayer().eval()
    x = torch.rand(1, 1, 28, 28) * (torch.rand(1, 1, 28, 28) > 0.7)
    message = "build_kernel_map cannot be traced"
    with pytest.raises(NotImplementedError, match=message):
        torch.export.export(module, (x,))
    with pytest.raises(Exception, match=message):
        torch.compile(module, fullgraph=True, backend="aot_eager")(x)


def test_sparse_model_traces_through_its_dense_equivalent():
    """Under compile/export the sparse U-Net's encoder runs on MaskedDense: the same function."""
    from fastvision.models import create_model

    torch.manual_seed(0)
    model = create_model("sparse_unet_mnist").eval()
    x = torch.rand(3, 1, 28, 28) * (torch.rand(3, 1, 28, 28) > 0.7)
    with torch.no_grad():
        eager = model(x)
        traced = torch.export.export(model, (x,)).module()(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_masked_dense_matches_sparse_modules():
    from fastvision.nn.sparse import ResidualSparseBlock, SparseMaxPool2d
    from fastvision.sparse.masked_dense import MaskedDense

    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 13) * (torch.rand(2, 1, 11, 13) > 0.6)
    block, pool = ResidualSparseBlock(3, 5), SparseMaxPool2d(3, stride=2)
    x_sparse, x_dense = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sparse, dense = SparseTensor.from_dense(x_sparse), MaskedDense.from_dense(x_dense)
    torch.testing.assert_close(dense.to_dense(), sparse.to_dense())
    sparse, dense = block(sparse), block(dense)
    torch.testing.assert_close(dense.to_dense(), sparse.to_dense(), atol=1e-5, rtol=1e-5)
    sparse, dense = pool(sparse), pool(dense)
    torch.testing.assert_close(dense.to_dense(), sparse.to_dense(), atol=1e-5, rtol=1e-5)
    active = torch.zeros(2, 1, *sparse.spatial_shape, dtype=torch.bool)
    active[sparse.coords[:, 0], 0, sparse.coords[:, 1], sparse.coords[:, 2]] = True
    assert torch.equal(dense.mask, active)
    # Gradients: the same at active input sites, zero at inactive ones in both.
    upstream = torch.randn_like(sparse.to_dense())
    (grad_sparse,) = torch.autograd.grad((sparse.to_dense() * upstream).sum(), x_sparse)
    (grad_dense,) = torch.autograd.grad((dense.to_dense() * upstream).sum(), x_dense)
    torch.testing.assert_close(grad_dense, grad_sparse, atol=1e-5, rtol=1e-5)
    assert (grad_dense[(x == 0).all(dim=1, keepdim=True).expand_as(x)] == 0).all()


@pytest.mark.parametrize(("kernel_size", "dilation"), [(1, 1), (3, 2), (5, 1), (5, 3)])
def test_masked_dense_conv_matches_sparse_conv(kernel_size, dilation):
    from fastvision.nn.sparse import SparseConv2d
    from fastvision.sparse.masked_dense import MaskedDense

    torch.manual_seed(kernel_size * 10 + dilation)
    x = torch.randn(2, 3, 12, 9) * (torch.rand(2, 1, 12, 9) > 0.5)
    conv = SparseConv2d(3, 4, kernel_size, dilation=dilation)
    with torch.no_grad():
        expected = conv(SparseTensor.from_dense(x)).to_dense()
        got = conv(MaskedDense.from_dense(x)).to_dense()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- coordinate keys cannot overflow --------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial_shape, batch_size",
    [((2**31, 2**31), 5), ((2**32, 2**32), 1), ((2**31, 2**31), 2), ((2**62 + 1, 1), 1)],
    ids=str,
)
def test_key_range_is_bounded_with_a_clear_error(spatial_shape, batch_size):
    coords = torch.tensor([[0, 0, 0], [batch_size - 1, 0, 0]], device=DEVICE)
    feats = _random((2, 3), seed=30)
    with pytest.raises(ValueError, match=r"batch_size \* H \* W must be at most 2\*\*62"):
        SparseTensor.from_coords(coords, feats, spatial_shape, batch_size)
    with pytest.raises(ValueError, match=r"at most 2\*\*62"):
        SparseTensor(coords, feats, spatial_shape, batch_size)
    with pytest.raises(ValueError, match=r"at most 2\*\*62"):
        build_kernel_map(coords, spatial_shape, 3, batch_size=batch_size)


def test_largest_canvas_keeps_batch_items_apart():
    """B * H * W = 2**62, the bound: the last site of item 0 and the first of item 1 are adjacent in
    key space but must neither merge nor pair, and every batch index survives."""
    spatial_shape = (2**30, 2**31)
    coords = torch.tensor([[1, 0, 0], [0, 2**30 - 1, 2**31 - 1], [1, 0, 1], [1, 0, 0]], device=DEVICE)
    feats = _random((4, 2), seed=31)
    x = SparseTensor.from_coords(coords, feats, spatial_shape, 2)
    assert x.coords.tolist() == [[0, 2**30 - 1, 2**31 - 1], [1, 0, 0], [1, 0, 1]]
    torch.testing.assert_close(x.feats, torch.stack([feats[1], feats[0] + feats[3], feats[2]]))
    km = x.kernel_map(3)
    expected = brute_force_kernel_map(x.coords.cpu(), spatial_shape, 3)
    for offset in range(9):
        ins, outs = km.pairs(offset)
        assert set(zip(ins.tolist(), outs.tolist(), strict=True)) == expected[offset], offset
    assert km.neighbors[0].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1, -1]  # isolated: itself only
    # The same without batch_size (taken from the last site) and as a SparseTensor round trip.
    assert torch.equal(build_kernel_map(x.coords, spatial_shape, 3).neighbors, km.neighbors)
    SparseTensor(x.coords, x.feats, spatial_shape, 2)


@pytest.mark.parametrize("dilation", [2**40, 2**62, 2**63, 2**80])
def test_dilation_past_the_canvas_pairs_only_the_centre(dilation):
    x = SparseTensor.from_dense(_random_sparse_dense((2, 1, 5, 6), 0.7, seed=32))
    km = x.kernel_map(3, dilation)
    assert km.offset_starts.tolist() == [0] * 5 + [x.num_sites] * 5
    assert torch.equal(km.neighbors[:, 4], torch.arange(x.num_sites, dtype=torch.int32, device=DEVICE))


# --- malformed kernel maps --------------------------------------------------------------------------


def _valid_map():
    x = SparseTensor.from_dense(_random_sparse_dense((2, 1, 6, 7), 0.6, seed=33))
    km = x.kernel_map(3)
    fields = {
        "in_indices": km.in_indices.clone(),
        "out_indices": km.out_indices.clone(),
        "offset_starts": km.offset_starts.clone(),
        "kernel_size": 3,
        "dilation": 1,
        "num_sites": km.num_sites,
        "neighbors": km.neighbors.clone(),
    }
    return x, fields


def _set(name, index, value):
    def edit(fields):
        fields[name][index] = value(fields) if callable(value) else value

    return edit


def _replace(name, value):
    def edit(fields):
        fields[name] = value(fields)

    return edit


def _swap_pair_order(fields):
    # Offset 0 and its mirror 8 keep their pair sets, but offset 0's first pair moves to offset 1.
    starts = fields["offset_starts"]
    starts[1] += 1


def _non_symmetric(fields):
    # One pair (i -> o) at offset 0 is dropped from both the pairs and the table: its mirror stays.
    neighbors, starts = fields["neighbors"], fields["offset_starts"]
    out = int(fields["out_indices"][0])
    neighbors[out, 0] = -1
    keep = torch.ones_like(fields["in_indices"], dtype=torch.bool)
    keep[0] = False
    fields["in_indices"], fields["out_indices"] = fields["in_indices"][keep], fields["out_indices"][keep]
    starts[1:] -= 1


MALFORMED_MAPS = [
    ("neighbour >= N", _set("neighbors", (0, 4), lambda f: f["num_sites"]), ValueError, "neighbors entries"),
    ("neighbour -2", _set("neighbors", (1, 0), -2), ValueError, r"-1 \(absent\)"),
    ("one-column table", _replace("neighbors", lambda f: f["neighbors"][:, :1].contiguous()), ValueError,
     r"neighbors must have shape \[num_sites, K\*K\]"),
    ("int64 table", _replace("neighbors", lambda f: f["neighbors"].long()), TypeError, "int32"),
    ("in_indices >= N", _set("in_indices", 0, lambda f: f["num_sites"]), ValueError, "in_indices must lie"),
    ("out_indices < 0", _set("out_indices", 0, -1), ValueError, "out_indices must lie"),
    ("starts decreasing", _set("offset_starts", 3, 0), ValueError, "without decreasing"),
    ("starts short of P", _set("offset_starts", 9, lambda f: int(f["offset_starts"][9]) - 1), ValueError,
     "number of pairs"),
    ("starts not from 0", _set("offset_starts", 0, 1), ValueError, "rise from 0"),
    ("starts wrong length", _replace("offset_starts", lambda f: f["offset_starts"][:-1]), ValueError,
     r"K\*K \+ 1 = 10"),
    ("pairs moved between offsets", _swap_pair_order, ValueError, "same map"),
    ("duplicate pair", _set("in_indices", 1, lambda f: int(f["in_indices"][0])), ValueError, "same map"),
    ("centre not the identity", _set("neighbors", (0, 4), 1), ValueError, "same map"),
    ("not symmetric", _non_symmetric, ValueError, "symmetric"),
    ("num_sites", _replace("num_sites", lambda f: f["num_sites"] + 1), ValueError, "neighbors must have sha"),
]  # fmt: skip


@pytest.mark.parametrize(
    "edit, error, match", [m[1:] for m in MALFORMED_MAPS], ids=[m[0] for m in MALFORMED_MAPS]
)
def test_malformed_kernel_map_is_refused_on_construction(edit, error, match):
    _, fields = _valid_map()
    KernelMap(**fields)  # the unedited map passes
    edit(fields)
    with pytest.raises(error, match=match):
        KernelMap(**fields)


def test_centre_offset_must_be_the_identity():
    _, fields = _valid_map()
    start, end = fields["offset_starts"][4:6].tolist()
    # Swap two sites' centre pairs in both forms: consistent, but no longer a submanifold map.
    fields["in_indices"][start : start + 2] = fields["in_indices"][start : start + 2].flip(0)
    fields["neighbors"][:2, 4] = fields["neighbors"][:2, 4].flip(0)
    with pytest.raises(ValueError, match="centre offset must pair every site with itself"):
        KernelMap(**fields)


# Maps made with check=False: the backends that read the edited tensors must refuse them (the public
# op re-checks the structure, every backend; each registered op checks the values it reads through).
_MALFORMED = {m[0]: m[1] for m in MALFORMED_MAPS}
_TABLE_READERS, _ALL = ("triton", "cpu"), ("reference", "triton", "cpu")
UNCHECKED_MAPS = [
    ("neighbour >= N", _TABLE_READERS, "neighbors entries must be -1"),
    ("neighbour -2", _TABLE_READERS, "neighbors entries must be -1"),
    ("one-column table", _ALL, r"neighbors must have shape \[num_sites, K\*K\]"),
    ("in_indices >= N", ("reference",), "in_indices must lie"),
    ("out_indices < 0", ("reference",), "out_indices must lie"),
    ("starts decreasing", ("reference",), "without decreasing"),
    ("starts short of P", ("reference",), "number of pairs"),
    ("starts wrong length", _ALL, r"K\*K \+ 1 = 10"),
]


UNCHECKED_PARAMS = [
    pytest.param(label, p.values[0], match, marks=p.marks, id=f"{label}-{p.values[0]}")
    for label, readers, match in UNCHECKED_MAPS
    for p in BACKENDS
    if p.values[0] in readers
]


@pytest.mark.parametrize("label, backend, match", UNCHECKED_PARAMS)
def test_public_op_refuses_an_unchecked_malformed_map(label, backend, match):
    x, fields = _valid_map()
    _MALFORMED[label](fields)
    km = KernelMap(**fields, check=False)
    weight = _random((9, 1, 3), seed=34).requires_grad_(True)
    with fastvision.use_backend(backend), pytest.raises(ValueError, match=match):
        sparse_conv2d(x.feats, km, weight).sum().backward()


@pytest.mark.parametrize("make", ["built", "validated", "moved"])
def test_known_good_maps_skip_the_table_check(monkeypatch, make):
    """Maps built by build_kernel_map or validated on construction (and their .to copies) reach the
    table kernels with no value check (no host sync); check=False maps are checked, once."""
    import fastvision.sparse.kernel_map as kernel_map_module

    x, fields = _valid_map()
    if make == "built":
        km = x.kernel_map(3)
    else:
        km = KernelMap(**fields) if make == "validated" else KernelMap(**fields).to("cpu")
    calls, real = [], kernel_map_module.check_neighbor_table
    monkeypatch.setattr(
        kernel_map_module, "check_neighbor_table", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    km.check_table()
    assert calls == []
    KernelMap(**fields, check=False).check_table()
    assert calls == [1]


def test_registered_ops_refuse_bad_maps_directly():
    x, fields = _valid_map()
    weight = _random((9, 1, 3), seed=35)
    ins, outs, starts = fields["in_indices"], fields["out_indices"], fields["offset_starts"]
    bad = ins.clone()
    bad[0] = x.num_sites + 7
    with pytest.raises(ValueError, match="in_indices must lie"):
        torch.ops.fastvision.sparse_conv2d_gather_gemm(x.feats, bad, outs, starts, weight)
    grad = _random((x.num_sites, 3), seed=36)
    with pytest.raises(ValueError, match="offset_starts must rise"):
        torch.ops.fastvision.sparse_conv2d_gather_gemm_backward(
            grad, x.feats, ins, outs, starts.flip(0).contiguous(), weight, True, True
        )
    with pytest.raises(ValueError, match=r"grad_out must have shape"):
        torch.ops.fastvision.sparse_conv2d_gather_gemm_backward(
            grad[:, :2], x.feats, ins, outs, starts, weight, True, True
        )


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
def test_kernel_ops_refuse_bad_tables_directly(backend):
    kernel = OPS["sparse_conv2d"].kernels[backend]
    x, fields = _valid_map()
    weight = _random((9, 1, 3), seed=37)
    grad = _random((x.num_sites, 3), seed=38)
    table = fields["neighbors"]
    for bad, match in (
        (table.clone().index_fill_(0, torch.tensor([2]), x.num_sites), "entries must be -1"),
        (table.clone().index_fill_(0, torch.tensor([2]), -5), "entries must be -1"),
        (table[:, :1].contiguous(), r"shape \[N, K\*K\]"),
    ):
        with pytest.raises(ValueError, match=match):
            kernel.forward_op()(x.feats, bad, weight)
        with pytest.raises(ValueError, match=match):
            kernel.backward_op()(grad, x.feats, bad, weight, True, True)
    asymmetric = table.clone()
    asymmetric[int(fields["out_indices"][0]), 0] = -1
    kernel.forward_op()(x.feats, asymmetric, weight)  # a forward needs no symmetry
    with pytest.raises(ValueError, match="symmetric"):
        kernel.backward_op()(grad, x.feats, asymmetric, weight, True, False)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
def test_a_table_modified_after_a_checked_call_is_checked_again(backend):
    kernel = OPS["sparse_conv2d"].kernels[backend]
    x, fields = _valid_map()
    weight = _random((9, 1, 3), seed=39)
    table = fields["neighbors"]
    kernel.forward_op()(x.feats, table, weight)
    table[3, 0] = x.num_sites  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="entries must be -1"):
        kernel.forward_op()(x.feats, table, weight)


# --- edge cases of every backend ------------------------------------------------------------------


def _sites(batch, channels, height, width, where, seed):
    """``[B, C, H, W]`` with random nonzero features exactly at the sites ``where`` marks."""
    values = _random((batch, channels, height, width), seed).abs() + 0.5
    return values * where.to(device=DEVICE, dtype=values.dtype)


def _isolated(shape):
    where = torch.zeros(shape, dtype=torch.bool)
    where[:, :, ::2, ::2] = True  # 3x3 kernels: no site has a neighbour
    return where


def _single(shape):
    where = torch.zeros(shape, dtype=torch.bool)
    where[0, 0, 2, 3] = True
    return where


def _dense(shape):
    return torch.ones(shape, dtype=torch.bool)


def _density(value, seed):
    return lambda shape: torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < value


# (batch, Cin, Cout, H, W, site mask) per case
EDGE_CASES = {
    "single site": (1, 3, 4, 5, 6, _single),
    "isolated sites": (2, 5, 3, 7, 9, _isolated),
    "all offsets present": (2, 4, 6, 7, 9, _dense),
    "odd channels 13->19": (1, 13, 19, 8, 9, _density(0.6, 3)),
    "one output channel": (1, 17, 1, 6, 7, _density(0.5, 4)),
    "several weight-gradient chunks": (1, 3, 5, 80, 81, _density(0.8, 5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_sparse_conv2d_edge_cases(backend, dtype, case):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64 (test_triton_rejects_float64 checks the error)")
    batch, cin, cout, height, width, mask = EDGE_CASES[case]
    where = mask((batch, 1, height, width))
    x = SparseTensor.from_dense(_sites(batch, cin, height, width, where, seed=40).to(dtype))
    assert x.num_sites == int(where.sum())
    weight = _random((9, cin, cout), 41, dtype, (9 * cin) ** -0.5)
    bias = _random((cout,), 42, dtype)
    # The weight gradient sums over every site: float32 rounding grows with the site count.
    _check_against_dense(x, weight, bias, 3, 1, backend, scale=max(1.0, x.num_sites / 500))
    km = x.kernel_map(3)
    if case == "isolated sites":
        assert km.in_indices.numel() == x.num_sites  # the centre offset only
    if case == "all offsets present":
        assert (km.neighbors[:, :] >= 0).sum() == km.in_indices.numel() > 8 * x.num_sites // 2


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_kernel_is_deterministic_for_any_thread_count(backend):
    x, weight, _, _, _ = _conv_inputs((2, 6, 7, 64, 64, 3, 0.6, 1), torch.float32, seed=43)
    assert x.num_sites > 2048  # more than one weight-gradient partial sum
    km = x.kernel_map(3)
    grad = _random((x.num_sites, 7), seed=44)
    kernel = OPS["sparse_conv2d"].kernels["cpu"]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1, threads):
            torch.set_num_threads(count)
            out = kernel.forward_op()(x.feats, km.neighbors, weight)
            results.append((out, *kernel.backward_op()(grad, x.feats, km.neighbors, weight, True, True)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_kernel_checks_its_arguments(backend):
    x, weight, _, _, _ = _conv_inputs((1, 3, 4, 6, 6, 3, 0.5, 1), torch.float32, seed=45)
    km = x.kernel_map(3)
    forward = OPS["sparse_conv2d"].kernels["cpu"].forward_op()
    backward = OPS["sparse_conv2d"].kernels["cpu"].backward_op()
    grad = _random((x.num_sites, 4), seed=46)
    with pytest.raises(TypeError, match="weight must have feats' dtype"):
        forward(x.feats, km.neighbors, weight.double())
    with pytest.raises(TypeError, match="neighbors must be int32"):
        forward(x.feats, km.neighbors.long(), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \[K\*K, Cin, Cout\]"):
        forward(x.feats, km.neighbors, weight[:, :2])
    with pytest.raises(ValueError, match=r"grad_out must have shape \[N, Cout\]"):
        backward(grad[:, :3], x.feats, km.neighbors, weight, True, True)
    with pytest.raises(TypeError, match="feats must be float32"):
        forward(x.feats.long(), km.neighbors, weight.long())


# --- the Triton implicit GEMM: skipped offsets, chunked weight gradient, product precision ---------

_TRITON = [p for p in BACKENDS if p.values[0] == "triton"]


def _triton_module():
    return importlib.import_module("fastvision.triton_kernels.sparse_conv2d")


@pytest.mark.parametrize("backend", _TRITON)
def test_triton_tile_offsets_list_the_offsets_present_in_each_tile(backend):
    module = _triton_module()
    x = SparseTensor.from_dense(_random_sparse_dense((2, 1, 40, 40), 0.08, seed=50))
    neighbors = x.kernel_map(3).neighbors
    for block_m in (16, 64):
        offsets, counts = module.tile_offsets(neighbors, block_m)
        tiles = -(-x.num_sites // block_m)
        assert offsets.shape == (tiles, 9) and counts.shape == (tiles,)
        for tile in range(tiles):
            present = (neighbors[tile * block_m : (tile + 1) * block_m] >= 0).any(0)
            want = torch.nonzero(present).flatten().tolist()
            assert counts[tile].item() == len(want)
            assert offsets[tile, : len(want)].tolist() == want
        assert counts.min() < 9, "some tile must skip an offset for this test to mean anything"


@pytest.mark.parametrize("backend", _TRITON)
def test_triton_skips_offsets_absent_from_a_tile_and_stays_exact(backend):
    """Sites far apart (each with the centre offset only) next to a dense blob: the blob's tiles run
    every offset, the others one; every output and gradient still matches the definition."""
    dense = torch.zeros(1, 3, 48, 48)
    dense[0, :, 0:48:4, 0:48:4] = _random((3, 12, 12), seed=51)
    dense[0, :, 20:30, 20:30] = _random((3, 10, 10), seed=52)
    x = SparseTensor.from_dense(dense.to(DEVICE))
    offsets, counts = _triton_module().tile_offsets(x.kernel_map(3).neighbors, 64)
    assert counts.min() == 1 and counts.max() == 9
    weight = _random((9, 3, 5), seed=53, scale=3**-1)
    bias = _random((5,), seed=54)
    _check_against_dense(x, weight, bias, 3, 1, backend)


@pytest.mark.parametrize("backend", _TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_weight_gradient_sums_chunks_in_a_fixed_order(backend, dtype):
    module = _triton_module()
    x, weight, _, _, _ = _conv_inputs((1, 7, 5, 80, 80, 3, 0.5, 1), dtype, seed=55)
    km = x.kernel_map(3)
    tile = module.weight_grad_tile(7, 5, dtype)
    splits, _ = module.weight_grad_split(x.num_sites, 7, 5, 9, tile)
    assert splits > 1, "the weight gradient must be summed over several chunks here"
    grad = _random((x.num_sites, 5), seed=56, dtype=dtype)
    backward = OPS["sparse_conv2d"].kernels["triton"].backward_op()
    first = backward(grad, x.feats, km.neighbors, weight, True, True)
    second = backward(grad, x.feats, km.neighbors, weight, True, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    reference = torch.zeros((9, 7, 5), dtype=torch.float64, device=DEVICE)
    feats64, grad64 = x.feats.double(), grad.double()
    for k in range(9):
        rows = km.neighbors[:, k] >= 0
        reference[k] = feats64[km.neighbors[rows, k].long()].T @ grad64[rows]
    # Each entry sums about N products of unit-scale values: rounding grows like sqrt(N).
    assert_close(first[1], reference, dtype, scale=x.num_sites**0.5)


def test_triton_float32_products_follow_the_matmul_precision():
    module = pytest.importorskip("fastvision.triton_kernels.sparse_conv2d")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert module.float32_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert module.float32_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
