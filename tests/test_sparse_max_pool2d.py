"""sparse_max_pool2d: every backend against a float64 dense max-pool, fwd and bwd; errors; compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, backend_params, stable_seed

import fastvision
from fastvision.ops import OPS
from fastvision.ops.sparse_max_pool2d import (
    sparse_max_pool2d,
    sparse_max_pool2d_output_shape,
    sparse_max_pool2d_reference,
)

BACKENDS = backend_params(OPS["sparse_max_pool2d"].backends)
CPP_OPS_BUILT = OPS["sparse_max_pool2d"].built("cpu") is None
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (kernel_size, stride): non-overlapping, overlapping (k > s), gapped (k < s), rectangular.
GEOMETRIES = [(2, 2), (3, 3), (2, 1), (3, 1), (3, 2), (2, 3), ((2, 3), (1, 2))]


def _random_map(
    batch, height, width, channels, density, seed, dtype=torch.float32, coord_dtype=torch.int64, ties=False
):
    """Canonical coords of a random sparse map and fresh features (small integers when ``ties``)."""
    generator = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, height, width, generator=generator) < density
    coords = active.nonzero().to(coord_dtype)  # nonzero() is row-major: already canonical
    n = coords.shape[0]
    if ties:
        feats = torch.randint(-4, 4, (n, channels), generator=generator).float()
    else:
        feats = torch.randn(n, channels, generator=generator) * 3
    return coords.to(DEVICE), feats.to(device=DEVICE, dtype=dtype)


def _dense_pool(coords, feats, kernel, stride, shape):
    """Float64 dense max-pool with -inf at inactive sites; keeps windows with >= 1 active input.

    Returns (out_coords, out_feats, pooled, active_windows, dense_input) for the backward check.
    """
    batch = int(coords[:, 0].max()) + 1 if coords.shape[0] else 1
    channels = feats.shape[1]
    b, y, x = coords.long().cpu().unbind(1)
    dense = torch.full((batch, channels, *shape), float("-inf"), dtype=torch.float64)
    dense[b, :, y, x] = feats.detach().double().cpu()
    occupancy = torch.zeros(batch, 1, *shape, dtype=torch.float64)
    occupancy[b, 0, y, x] = 1
    dense.requires_grad_(True)
    pooled = F.max_pool2d(dense, kernel, stride)
    windows = F.max_pool2d(occupancy, kernel, stride)[:, 0] > 0
    out_coords = windows.nonzero()
    ob, oy, ox = out_coords.unbind(1)
    return out_coords, pooled[ob, :, oy, ox], pooled, windows, dense


def _unbounded_shape(coords, kernel, stride):
    """A dense extent holding every window that touches an active site (the spatial_shape=None extent)."""
    (ky, kx), (sy, sx) = (
        (kernel, kernel) if isinstance(kernel, int) else kernel,
        (stride, stride) if isinstance(stride, int) else stride,
    )
    ymax, xmax = (int(coords[:, 1].max()), int(coords[:, 2].max())) if coords.shape[0] else (0, 0)
    return (ymax // sy) * sy + ky, (xmax // sx) * sx + kx


def _check(coords, feats, kernel, stride, backend, spatial_shape=None, seed=0):
    shape = spatial_shape if spatial_shape is not None else _unbounded_shape(coords, kernel, stride)
    expected_coords, expected_feats, pooled, windows, dense = _dense_pool(
        coords, feats, kernel, stride, shape
    )
    grad_out = torch.randn(expected_feats.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(feats.dtype)
    full_grad = torch.zeros_like(pooled)
    ob, oy, ox = expected_coords.unbind(1)
    full_grad[ob, :, oy, ox] = grad_out.double()
    (dense_grad,) = torch.autograd.grad(pooled, dense, full_grad)
    b, y, x = coords.long().cpu().unbind(1)
    expected_grad = dense_grad[b, :, y, x]

    feats_before = feats.clone()
    leaf = feats.detach().requires_grad_(True)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, leaf, kernel, stride, spatial_shape)
        (grad,) = torch.autograd.grad(out_feats, leaf, grad_out.to(DEVICE))
    assert out_coords.dtype == coords.dtype and out_feats.dtype == feats.dtype and grad.dtype == feats.dtype
    torch.testing.assert_close(out_coords.long().cpu(), expected_coords, atol=0, rtol=0)
    # A max is exact: the outputs are input values, bit for bit.
    torch.testing.assert_close(out_feats.double().cpu(), expected_feats.detach(), atol=0, rtol=0)
    # Gradients sum over overlapping windows in float32 and round once.
    assert_close(grad, expected_grad, feats.dtype, scale=2.0)
    torch.testing.assert_close(feats, feats_before, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("bounded", [True, False], ids=["spatial_shape", "unbounded"])
def test_matches_dense(backend, geometry, bounded):
    kernel, stride = geometry
    coords, feats = _random_map(3, 11, 13, 5, 0.35, seed=stable_seed(geometry) % 1000)
    _check(coords, feats, kernel, stride, backend, (11, 13) if bounded else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_ties_route_to_lowest_index(backend, geometry):
    """Small-integer features: many equal maxima per window; the dense op also picks the first."""
    kernel, stride = geometry
    coords, feats = _random_map(2, 9, 10, 4, 0.6, seed=7, ties=True)
    _check(coords, feats, kernel, stride, backend, (9, 10))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coord_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("channels", [1, 8, 16, 64, 65])
def test_dtypes_and_channels(backend, dtype, coord_dtype, channels):
    coords, feats = _random_map(2, 7, 9, channels, 0.4, seed=channels, dtype=dtype, coord_dtype=coord_dtype)
    _check(coords, feats, 3, 2, backend, (7, 9))
    _check(coords, feats, 2, 2, backend, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_windows_ignore_inactive_sites(backend):
    coords = torch.tensor([[0, 0, 0], [0, 1, 3], [0, 3, 3], [1, 2, 0]], device=DEVICE)
    feats = torch.tensor([[-5.0, -1.0], [-2.0, -7.0], [-3.0, -3.0], [-9.0, -0.5]], device=DEVICE)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 2)
    assert out_coords.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0]]
    assert out_feats.tolist() == [[-5.0, -1.0], [-2.0, -7.0], [-3.0, -3.0], [-9.0, -0.5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_site_and_far_coordinates(backend):
    """Large coordinates: nothing in the op scales with the map's extent."""
    coords = torch.tensor([[0, 5, 8], [4, 2_000_000_000, 1_999_999_999]], device=DEVICE)
    feats = torch.tensor([[1.5], [2.5]], device=DEVICE)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 3, 2)
    # Windows [2o, 2o + 3): an odd coordinate 2m + 1 lies in window m only, an even one 2m in m - 1 and m.
    assert out_coords.tolist() == [
        [0, 2, 3], [0, 2, 4], [4, 999_999_999, 999_999_999], [4, 1_000_000_000, 999_999_999]
    ]  # fmt: skip
    assert out_feats.flatten().tolist() == [1.5, 1.5, 2.5, 2.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0]], device=DEVICE)
    feats = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0], [3.0, 5.0]], device=DEVICE)
    with fastvision.use_backend(backend):
        _, out_feats = sparse_max_pool2d(coords, feats, 2)
    assert torch.isnan(out_feats).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [0, 3])
def test_empty(backend, channels):
    coords = torch.empty(0, 3, dtype=torch.int64, device=DEVICE)
    feats = torch.randn(0, channels, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 2, spatial_shape=(4, 4))
        out_feats.sum().backward()
    assert out_coords.shape == (0, 3) and out_feats.shape == (0, channels)
    assert feats.grad.shape == (0, channels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_window_inside_spatial_shape(backend):
    """Sites that only touch windows past the floor-mode edge produce an empty output."""
    coords = torch.tensor([[0, 4, 4]], device=DEVICE)
    feats = torch.randn(1, 3, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 2, spatial_shape=(5, 5))
        out_feats.sum().backward()
    assert out_coords.shape == (0, 3) and out_feats.shape == (0, 3)
    assert (feats.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_feats(backend):
    coords, wide = _random_map(2, 8, 8, 10, 0.5, seed=3)
    _check(coords, wide[:, ::2], 2, 2, backend, (8, 8))


def test_output_shape_is_floor_mode():
    assert sparse_max_pool2d_output_shape((28, 28)) == (14, 14)
    assert sparse_max_pool2d_output_shape((7, 9), 3, 2) == (3, 4)
    assert sparse_max_pool2d_output_shape((1, 5), 2) == (0, 2)
    dense = F.max_pool2d(torch.zeros(1, 1, 7, 9), 3, 2)
    assert tuple(dense.shape[-2:]) == sparse_max_pool2d_output_shape((7, 9), 3, 2)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
def test_cpp_op_gradcheck():
    coords, feats = _random_map(1, 5, 6, 2, 0.7, seed=4, dtype=torch.float64)
    coords, feats = coords.cpu(), feats.cpu().requires_grad_(True)

    def pooled(f):
        return torch.ops.fastvision.sparse_max_pool2d_forward(coords, f, [3, 3], [2, 1], [-1, -1])[1]

    torch.autograd.gradcheck(pooled, (feats,))
    torch.autograd.gradgradcheck(pooled, (feats,))


def test_reference_is_gather_of_argmax():
    coords, feats = _random_map(2, 6, 6, 3, 0.5, seed=5, ties=True)
    feats = feats.double().requires_grad_(True)
    _, out = sparse_max_pool2d_reference(coords, feats, 2)
    out.sum().backward()
    # Non-overlapping windows: every window's max comes from exactly one input per channel.
    assert feats.grad.sum().item() == out.numel()


# --- errors --------------------------------------------------------------------------------------


def _valid():
    return torch.tensor([[0, 0, 0], [0, 1, 2]], device=DEVICE), torch.randn(2, 4, device=DEVICE)


@pytest.mark.parametrize(
    "coords, message",
    [
        pytest.param([[0, 1, 2], [0, 0, 0]], "sorted lexicographically", id="unsorted"),
        pytest.param([[0, 1, 2], [0, 1, 2]], "without duplicates", id="duplicate"),
        pytest.param([[1, 0, 0], [0, 5, 5]], "sorted lexicographically", id="batch-unsorted"),
        pytest.param([[0, 0, -1], [0, 1, 2]], "non-negative", id="negative"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_bad_coords(backend, coords, message):
    with fastvision.use_backend(backend), pytest.raises(ValueError, match=message):
        sparse_max_pool2d(torch.tensor(coords, device=DEVICE), torch.randn(2, 4, device=DEVICE))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
@pytest.mark.parametrize(
    "coords, message",
    [
        pytest.param([[0, 1, 2], [0, 0, 0]], "sorted", id="unsorted"),
        pytest.param([[0, 1, 2], [0, 1, 2]], "duplicates", id="duplicate"),
        pytest.param([[0, 0, -1], [0, 1, 2]], "non-negative", id="negative"),
    ],
)
def test_kernels_validate_without_check(backend, coords, message):
    """check_coords=False drops the Python check; the C++ kernels still refuse bad coords."""
    with fastvision.use_backend(backend), pytest.raises(ValueError, match=message):
        sparse_max_pool2d(
            torch.tensor(coords, device=DEVICE), torch.randn(2, 4, device=DEVICE), check_coords=False
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_coords_outside_spatial_shape(backend):
    coords, feats = _valid()
    with fastvision.use_backend(backend), pytest.raises(ValueError, match="inside spatial_shape"):
        sparse_max_pool2d(coords, feats, 2, spatial_shape=(2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_sites_outside_spatial_shape_are_ignored(backend):
    coords = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 2, 2]], device=DEVICE)
    feats = torch.tensor([[1.0], [-4.0], [9.0]], device=DEVICE)
    with fastvision.use_backend(backend):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 2, spatial_shape=(2, 2), check_coords=False)
    assert out_coords.tolist() == [[0, 0, 0]] and out_feats.tolist() == [[1.0]]


@pytest.mark.parametrize(
    "coords, feats, error, message",
    [
        pytest.param(
            torch.zeros(2, 2, dtype=torch.int64), torch.randn(2, 4), ValueError, r"\[N, 3\]", id="shape"
        ),
        pytest.param(
            torch.zeros(2, 3), torch.randn(2, 4), TypeError, "coords must have dtype", id="float-coords"
        ),
        pytest.param(
            torch.zeros(2, 3, dtype=torch.int64),
            torch.ones(2, 4, dtype=torch.int32),
            TypeError,
            "feats must have dtype",
            id="int-feats",
        ),
        pytest.param(torch.zeros(2, 3, dtype=torch.int64), torch.randn(3, 4), ValueError, "N = 2", id="rows"),
        pytest.param(
            torch.zeros(2, 3, dtype=torch.int64), torch.randn(2), ValueError, r"\[N, C\]", id="feats-1d"
        ),
        pytest.param([[0, 0, 0]], torch.randn(1, 4), TypeError, "coords must be a torch.Tensor", id="list"),
    ],
)
def test_rejects_bad_arguments(coords, feats, error, message):
    with pytest.raises(error, match=message):
        sparse_max_pool2d(coords, feats)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param({"kernel_size": 0}, ValueError, "kernel_size must be positive", id="kernel-0"),
        pytest.param({"kernel_size": -2}, ValueError, "kernel_size must be positive", id="kernel-neg"),
        pytest.param(
            {"kernel_size": 2, "stride": (1, 0)}, ValueError, "stride must be positive", id="stride-0"
        ),
        pytest.param({"kernel_size": 2.0}, TypeError, "kernel_size must be an int", id="kernel-float"),
        pytest.param({"kernel_size": (2, 2, 2)}, TypeError, "pair of ints", id="kernel-triple"),
        pytest.param({"spatial_shape": (0, 4)}, ValueError, "spatial_shape must be positive", id="shape-0"),
    ],
)
def test_rejects_bad_geometry(kwargs, error, message):
    coords, feats = _valid()
    with pytest.raises(error, match=message):
        sparse_max_pool2d(coords, feats, **kwargs)


def test_forced_backend_that_cannot_run_raises():
    coords, feats = _valid()
    with fastvision.use_backend("cuda"), pytest.raises(fastvision.BackendUnavailableError, match="cuda"):
        sparse_max_pool2d(coords.cpu(), feats.cpu())


# --- registration: opcheck, compile, export --------------------------------------------------------


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
@pytest.mark.parametrize("geometry", [((2, 2), (2, 2)), ((3, 3), (1, 2))], ids=str)
def test_opcheck(geometry):
    kernel, stride = geometry
    coords, feats = _random_map(2, 6, 7, 3, 0.5, seed=9)
    # The aot_dispatch utils add up every output into one accumulator, which fails when the first output
    # is integer (out_coords) and a later one float; test_compile_fullgraph covers AOT dispatch instead.
    result = torch.library.opcheck(
        torch.ops.fastvision.sparse_max_pool2d_forward.default,
        (coords, feats.requires_grad_(True), list(kernel), list(stride), [-1, -1]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    assert set(result.values()) == {"SUCCESS"}, result


class _Pool(torch.nn.Module):
    def forward(self, coords, feats):
        out_coords, out_feats = sparse_max_pool2d(coords, feats, 2, check_coords=False)
        return out_coords, out_feats * 2


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_compile_fullgraph(backend):
    """The C++ op's output size is a dynamic (unbacked) size: no graph break."""
    coords, feats = _random_map(2, 9, 9, 4, 0.5, seed=12)
    feats.requires_grad_(True)
    with fastvision.use_backend(backend):
        expected = _Pool()(coords, feats)
        compiled = torch.compile(_Pool(), fullgraph=True, backend="aot_eager")
        out_coords, out_feats = compiled(coords, feats)
        out_feats.sum().backward()
    torch.testing.assert_close(out_coords, expected[0])
    torch.testing.assert_close(out_feats, expected[1])
    assert feats.grad is not None and feats.grad.sum().item() == 2 * out_feats.numel()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_export(backend):
    coords, feats = _random_map(2, 9, 9, 4, 0.5, seed=13)
    with fastvision.use_backend(backend):
        n = torch.export.Dim("n", max=2**31 - 1)  # the op checks that N fits its int32 argmax
        exported = torch.export.export(
            _Pool(), (coords, feats), dynamic_shapes={"coords": {0: n}, "feats": {0: n}}
        )
        expected = _Pool()(coords, feats)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("sparse_max_pool2d" in t for t in targets), targets
    other_coords, other_feats = _random_map(1, 6, 6, 4, 0.5, seed=14)  # another N, another M
    for args, want in [((coords, feats), expected), ((other_coords, other_feats), None)]:
        got = exported.module()(*args)
        if want is None:
            with fastvision.use_backend(backend):
                want = _Pool()(*args)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


# --- bounds: no integer overflow anywhere, a clear error instead --------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_coords_near_int64_limit(backend):
    coords = torch.tensor([[0, 2**63 - 10, 0], [0, 2**63 - 9, 0], [0, 2**63 - 8, 0]], device=DEVICE)
    feats = torch.randn(3, 2, device=DEVICE)
    with fastvision.use_backend(backend), pytest.raises(ValueError, match=r"coords must be below 2\*\*62"):
        sparse_max_pool2d(coords, feats, 3, 1)


@pytest.mark.parametrize("name", ["kernel_size", "stride"])
@pytest.mark.parametrize("value", [2**31, 3 * 2**61, 2**63, 2**70])
@pytest.mark.parametrize("rows", [0, 3])
def test_rejects_huge_geometry(name, value, rows):
    coords = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 2, 3]])[:rows]
    feats = torch.randn(rows, 2)
    with pytest.raises(ValueError, match=rf"{name} must be at most 2147483647"):
        sparse_max_pool2d(coords, feats, **{"kernel_size": 2, name: value})


def test_rejects_window_count_past_int32_even_when_empty():
    with pytest.raises(ValueError, match="must fit int32"):
        sparse_max_pool2d(torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 2), 2**31 - 1, 1)


def test_reference_refuses_tracing_with_a_clear_error():
    coords, feats = _random_map(1, 6, 6, 2, 0.5, seed=15)
    message = "the reference backend cannot be traced"
    with fastvision.use_backend("reference"):
        with pytest.raises(Exception, match=message):
            torch.compile(_Pool(), fullgraph=True, backend="aot_eager")(coords, feats)
        with pytest.raises(NotImplementedError, match=message):
            torch.export.export(_Pool(), (coords, feats))


# --- direct calls of the C++ ops: the public op's bounds, checked again -------------------------------

TWO_SITES = [[0, 0, 0], [0, 1, 1]]
AT_MOST_INT32 = "at most 2\\*\\*31 - 1"


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
@pytest.mark.parametrize(
    "coords, kernel, stride, limit, message",
    [
        pytest.param(TWO_SITES, [2**62, 2**62], [1, 1], [-1, -1], AT_MOST_INT32, id="kernel-2^62"),
        pytest.param(TWO_SITES, [2**63 - 1, 2], [1, 1], [-1, -1], AT_MOST_INT32, id="kernel-max"),
        pytest.param(TWO_SITES, [2, 2], [2**63 - 1, 1], [-1, -1], AT_MOST_INT32, id="stride-max"),
        pytest.param([[0, 2**62, 0]], [2**31 - 1, 2], [1, 1], [-1, -1], "must fit int32", id="window-count"),
        pytest.param([[0, 2**62, 0]], [2, 2], [2, 2], [-1, -1], "below 2\\*\\*62", id="coords-2^62"),
        pytest.param([[0, 0, 0]], [0, 2], [1, 1], [-1, -1], "must be positive", id="kernel-0"),
        pytest.param([[0, 0, 0]], [2, 2, 2], [1, 1], [-1, -1], "two entries", id="three-entries"),
    ],
)
def test_cpp_forward_checks_geometry_and_coords(coords, kernel, stride, limit, message):
    coords = torch.tensor(coords, dtype=torch.int64)
    feats = torch.randn(coords.shape[0], 2)
    with pytest.raises(ValueError, match=message):
        torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, kernel, stride, limit)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
def test_cpp_forward_with_huge_window_limits_matches_unbounded():
    coords, feats = _random_map(2, 6, 7, 3, 0.5, seed=21)
    coords, feats = coords.cpu(), feats.cpu()
    bounded = torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, [2, 2], [1, 1], [2**62, 2**62])
    unbounded = torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, [2, 2], [1, 1], [-1, -1])
    for a, b in zip(bounded, unbounded, strict=True):
        assert torch.equal(a, b)


# --- the argmax as a window offset, and the backward tables checked on direct calls -------------------


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
@pytest.mark.parametrize(
    "kernel, stride, dtype",
    [
        ((2, 2), (2, 2), torch.uint8),
        ((3, 3), (2, 1), torch.uint8),
        ((16, 16), (5, 7), torch.uint8),
        ((17, 16), (4, 4), torch.int16),
        ((181, 181), (60, 90), torch.int16),
        ((182, 181), (91, 181), torch.int32),
    ],
    ids=str,
)
def test_cpp_argmax_is_the_window_offset_of_the_max(kernel, stride, dtype):
    """argmax[w, c] = (y - oy*sy) * kx + (x - ox*sx) of the input holding the max, in the narrowest
    dtype for ky * kx; site_offset is each input's offset in its first window; the op's fake agrees."""
    from fastvision.ops.sparse_max_pool2d import argmax_dtype

    coords, feats = _random_map(2, 40, 37, 3, 0.3, seed=sum(kernel), ties=True)
    coords, feats = coords.cpu(), feats.cpu()
    out_coords, out_feats, argmax, window_map, site = torch.ops.fastvision.sparse_max_pool2d_forward(
        coords, feats, list(kernel), list(stride), [-1, -1]
    )
    assert argmax.dtype == dtype == argmax_dtype(kernel) and site.dtype == dtype
    (ky, kx), (sy, sx) = kernel, stride
    oy, ox = out_coords[:, 1:2].long(), out_coords[:, 2:3].long()
    y, x = oy * sy + argmax.long() // kx, ox * sx + argmax.long() % kx
    assert (argmax.long() < ky * kx).all() and (argmax.long() % kx < kx).all()
    key = {tuple(c): i for i, c in enumerate(coords.tolist())}
    for w in range(out_coords.shape[0]):
        b = int(out_coords[w, 0])
        for c in range(feats.shape[1]):
            i = key[(b, int(y[w, c]), int(x[w, c]))]  # the offset names an active input of the window
            assert feats[i, c] == out_feats[w, c]
    fy = torch.where(coords[:, 1] < ky, 0, (coords[:, 1] - ky) // sy + 1)
    fx = torch.where(coords[:, 2] < kx, 0, (coords[:, 2] - kx) // sx + 1)
    ry, rx = coords[:, 1] - fy * sy, coords[:, 2] - fx * sx
    expected = torch.where((ry >= 0) & (rx >= 0), ry * kx + rx, 0)
    assert torch.equal(site.long(), expected.long())
    assert window_map.shape == (coords.shape[0], -(-ky // sy) * -(-kx // sx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [((17, 5), (3, 2)), ((4, 20), (4, 20))], ids=str)
def test_matches_dense_with_wide_windows(backend, geometry):
    """Windows of more than 256 sites: the argmax is int16."""
    kernel, stride = geometry
    coords, feats = _random_map(2, 23, 26, 3, 0.3, seed=31)
    _check(coords, feats, kernel, stride, backend, (23, 26))


def _pool_tables(kernel=(3, 3), stride=(2, 2)):
    coords, feats = _random_map(2, 9, 10, 4, 0.5, seed=41)
    outputs = torch.ops.fastvision.sparse_max_pool2d_forward(
        coords.cpu(), feats.cpu(), list(kernel), list(stride), [-1, -1]
    )
    grad = torch.randn(outputs[1].shape, generator=torch.Generator().manual_seed(2))
    return grad, outputs[2], outputs[3], outputs[4], list(kernel), list(stride)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
def test_cpp_backward_matches_its_reference():
    from fastvision.ops.sparse_max_pool2d import _backward_op_reference

    for kernel, stride in [((3, 3), (2, 2)), ((2, 3), (1, 2)), ((2, 2), (3, 3))]:
        args = _pool_tables(kernel, stride)
        got = torch.ops.fastvision.sparse_max_pool2d_backward(*args)
        torch.testing.assert_close(got, _backward_op_reference(*args), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
@pytest.mark.parametrize(
    "position, value, message",
    [
        (1, 9, r"argmax must hold window offsets in \[0, ky \* kx\) = \[0, 9\), got 9 at"),
        (2, 10**6, r"window_map must hold output rows in \[0, M\) = \[0, \d+\) or -1 \(no window\), got 10+"),
        (2, -3, r"window_map must hold output rows .* got -3 at"),
        (3, 200, r"site_offset must hold window offsets in \[0, ky \* kx\) = \[0, 9\), got 200 at"),
    ],
    ids=["argmax", "window-map-far", "window-map-negative", "site-offset"],
)
def test_cpp_backward_refuses_out_of_range_tables(position, value, message):
    args = list(_pool_tables())
    table = args[position].clone()
    table.view(-1)[table.numel() // 2] = value
    args[position] = table
    with pytest.raises(ValueError, match=message):
        torch.ops.fastvision.sparse_max_pool2d_backward(*args)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
def test_cpp_backward_refuses_tables_of_another_geometry():
    grad, argmax, window_map, site, kernel, stride = _pool_tables()
    with pytest.raises(ValueError, match=r"window_map must be int32 \[N, 1\]"):
        torch.ops.fastvision.sparse_max_pool2d_backward(grad, argmax, window_map, site, kernel, [3, 3])
    with pytest.raises(ValueError, match="argmax must be Short"):
        torch.ops.fastvision.sparse_max_pool2d_backward(grad, argmax, window_map, site, [17, 17], stride)


@pytest.mark.skipif(not CPP_OPS_BUILT, reason="the C++ ops are not built")
def test_cpp_forward_checks_the_coord_bound():
    coords = torch.tensor([[0, 0, 0], [0, 1, 2], [1, 3, 0]])
    feats = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"inside spatial_shape \(4, 2\), row 1 is \[0, 1, 2\]"):
        torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, [2, 2], [2, 2], [-1, -1], [4, 2])
    unchecked = torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, [2, 2], [2, 2], [-1, -1])
    bounded = torch.ops.fastvision.sparse_max_pool2d_forward(coords, feats, [2, 2], [2, 2], [-1, -1], [4, 3])
    for a, b in zip(unchecked, bounded, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the sync count of the CUDA kernels)")
@pytest.mark.skipif(OPS["sparse_max_pool2d"].built("cuda") is not None, reason="the CUDA kernel is not built")
def test_cuda_syncs_once_forward_and_never_backward():
    """The forward reads the output count back (one synchronization, spatial_shape checked in the
    same read); the backward none (the public op's backward skips the direct-call range check)."""
    import warnings

    coords, feats = _random_map(2, 30, 31, 8, 0.3, seed=51)
    coords, feats = coords.cuda(), feats.cuda().requires_grad_(True)
    with fastvision.use_backend("cuda"):
        sparse_max_pool2d(coords, feats, 3, 2, (30, 31))  # warm-up (the first call sets up the device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as forward:
                warnings.simplefilter("always")
                _, out = sparse_max_pool2d(coords, feats, 3, 2, (30, 31))
            grad = torch.randn_like(out)
            with warnings.catch_warnings(record=True) as backward:
                warnings.simplefilter("always")
                torch.autograd.grad(out, feats, grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in forward if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in forward]
    assert not [w for w in backward if "synchroniz" in str(w.message)]
