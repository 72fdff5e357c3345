"""Sparse 2-D max pooling over the active sites of a sparse feature map.

A sparse map is ``coords [N, 3]`` (batch, y, x), int32 or int64, in canonical order (sorted
lexicographically by (batch, y, x), no duplicates), and ``feats [N, C]``. Window ``(b, oy, ox)`` covers
``y in [oy*sy, oy*sy + ky)`` and ``x in [ox*sx, ox*sx + kx)``. The output holds every window with at
least one active input, in canonical order, each with the channel-wise max over its *active* inputs:
inactive sites never count as zeros, so a window whose inputs are all negative returns their max.
Windows may overlap (kernel_size > stride).

Output extent:
  * ``spatial_shape=(H, W)`` given: floor mode, as ``F.max_pool2d`` (no padding, ceil_mode=False):
    only windows that lie inside the map, ``oy < (H - ky) // sy + 1``; coords must lie inside it.
  * ``spatial_shape=None``: every window ``oy, ox >= 0`` that holds an active site (an unbounded map).

Backward: each output channel's gradient goes to the input that holds its max, the lowest input index
on ties (that is the first in row-major order inside the window, as the dense op picks); with overlap an
input sums the gradients of every output it is the max of.

Backends: ``reference`` (below: unique + scatter_reduce), ``cpu`` (csrc/cpu/sparse_max_pool2d.cpp),
``cuda`` (csrc/cuda/sparse_max_pool2d.cu). The C++ ops ``fastvision::sparse_max_pool2d_forward`` /
``sparse_max_pool2d_backward`` (schema in csrc/sparse_max_pool2d.cpp) get, through the op contract
(``fastvision/ops/_contract.py``), a fake kernel with a data-dependent output size and autograd, so
torch.compile / torch.export see one opaque op.
The forward returns, besides the pooled map, the argmax ``[M, C]`` as window offsets
(``(y - oy*sy) * kx + (x - ox*sx)`` of each max: uint8 for windows of at most 256 sites, so kernel_size
up to 16, int16 up to 32768, else int32 / int64, :func:`argmax_dtype`), a ``window_map [N, P]`` int32
(for each input, the output row of each of the ``P = ceil(ky/sy) * ceil(kx/sx)`` windows that can hold
it, or -1) and ``site_offset [N]`` (each input's offset in the first window that holds it); the backward
gathers with them: no atomics, deterministic, no host synchronization.

Validation (``ValueError``): the C++ kernels always check that coords are non-negative, below 2**62
and in canonical order, and with ``check_coords=True`` that they lie inside ``spatial_shape`` (when
given), at no extra cost (the CPU kernel in its first pass over the coords; the CUDA kernel raises
flags that it reads back with the output count), also while torch.compile / torch.export trace. The
reference backend checks the same in Python (one host synchronization on CUDA tensors), skipped while
tracing. With ``check_coords=False`` the reference pools whatever it is given, and the kernels ignore
sites outside ``spatial_shape`` (no window inside the map holds them).

Launches and host synchronizations on CUDA: the forward is two kernels (a cooperative planning kernel
that validates, numbers the output windows and fills the window map; the pooling kernel) and one host
synchronization (the output count with the error flags, which sizes the outputs); a non-contiguous
``feats`` adds one copy. The backward is one kernel and never synchronizes.

Bounds: ``kernel_size`` and ``stride`` are at most ``2**31 - 1``, and int64 coordinates below
``2**62`` (checked with ``check_coords``), so that window arithmetic never overflows int64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastvision.ops._checks import check_dtype, check_same_device, check_tensor
from fastvision.ops._contract import AutogradRule, KernelBackend, OpCost, OpSpec, define_op
from fastvision.ops._native_trust import trusted_native_calls

COORD_DTYPES = (torch.int32, torch.int64)
# Max pooling does no arithmetic, so float64 costs nothing extra (and makes gradcheck possible).
FEAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MAX = 2**31 - 1
# Coordinates past this could overflow int64 in window arithmetic (oy * sy + ky).
COORD_LIMIT = 2**62

IntPair = int | Sequence[int]


def _pair(name: str, value: IntPair) -> tuple[int, int]:
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (
            isinstance(value, Sequence)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if max(pair) > _INT32_MAX:
        raise ValueError(f"{name} must be at most {_INT32_MAX} (2**31 - 1), got {value!r}")
    return pair


def _geometry(
    kernel_size: IntPair, stride: IntPair | None, spatial_shape: IntPair | None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, window_limit); window_limit is the window count per axis, -1 when unbounded."""
    kernel = _pair("kernel_size", kernel_size)
    step = kernel if stride is None else _pair("stride", stride)
    if spatial_shape is None:
        return kernel, step, (-1, -1)
    shape = _pair("spatial_shape", spatial_shape)
    limit = tuple(max(0, (extent - k) // s + 1) for extent, k, s in zip(shape, kernel, step, strict=True))
    return kernel, step, limit  # type: ignore[return-value]


def sparse_max_pool2d_output_shape(
    spatial_shape: IntPair, kernel_size: IntPair = 2, stride: IntPair | None = None
) -> tuple[int, int]:
    """The pooled map's (H', W') for a map of ``spatial_shape``: floor mode, as ``F.max_pool2d``."""
    return _geometry(kernel_size, stride, spatial_shape)[2]


def _windows_per_input(kernel: tuple[int, int], step: tuple[int, int]) -> int:
    return -(-kernel[0] // step[0]) * -(-kernel[1] // step[1])


def sparse_max_pool2d_reference(
    coords: torch.Tensor,
    feats: torch.Tensor,
    kernel_size: IntPair = 2,
    stride: IntPair | None = None,
    spatial_shape: IntPair | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in plain PyTorch: output keys by ``unique``, maxima by ``scatter_reduce``.

    ``out_feats`` is a ``gather`` of ``feats`` at the argmax (lowest input index among equal maxima),
    so autograd routes each gradient to that input and sums over overlapping windows.
    """
    (ky, kx), (sy, sx), (limit_y, limit_x) = _geometry(kernel_size, stride, spatial_shape)
    n, channels = feats.shape
    if n == 0:
        return coords.new_empty((0, 3)), feats[:0]
    b, y, x = coords.long().unbind(1)
    source = torch.arange(n, device=coords.device)
    # Candidate windows of each input: oy = y // sy - dy, for dy while the window still reaches y.
    parts = []
    for dy in range(-(-ky // sy)):
        for dx in range(-(-kx // sx)):
            oy, ox = y // sy - dy, x // sx - dx
            keep = (oy >= 0) & (ox >= 0) & (y < oy * sy + ky) & (x < ox * sx + kx)
            if limit_y >= 0:
                keep &= (oy < limit_y) & (ox < limit_x)
            parts.append((source[keep], b[keep], oy[keep], ox[keep]))
    source, b, oy, ox = (torch.cat(column) for column in zip(*parts, strict=True))
    if source.numel() == 0:
        return coords.new_empty((0, 3)), feats[:0]
    batches, height, width = int(b.max()) + 1, int(oy.max()) + 1, int(ox.max()) + 1
    if batches * height * width < 2**62:  # one int64 key per window: a 1-D unique is much faster
        keys, window = torch.unique((b * height + oy) * width + ox, sorted=True, return_inverse=True)
        out_coords = torch.stack([keys // (height * width), keys // width % height, keys % width], 1)
    else:
        out_coords, window = torch.unique(torch.stack([b, oy, ox], 1), dim=0, return_inverse=True)
    keys = out_coords[:, 0]
    index = window[:, None].expand(-1, channels)
    with torch.no_grad():
        values = feats.detach()[source]
        best = values.new_empty((keys.numel(), channels)).scatter_reduce_(
            0, index, values, "amax", include_self=False
        )[window]
        is_max = (values == best) | (values.isnan() & best.isnan())
        candidates = torch.where(is_max, source[:, None], n)
        argmax = torch.full((keys.numel(), channels), n, device=coords.device)
        argmax.scatter_reduce_(0, index, candidates, "amin")
    return out_coords.to(coords.dtype), feats.gather(0, argmax)


def _check_coords(coords: torch.Tensor, spatial_shape: tuple[int, int] | None, order_and_sign: bool) -> None:
    """Inside spatial_shape, below COORD_LIMIT, and (order_and_sign) non-negative, sorted and unique:
    at most one host sync."""
    wide = coords.dtype == torch.int64
    if spatial_shape is None and not order_and_sign and not wide:
        return
    bad = torch.zeros((), dtype=torch.bool, device=coords.device)
    if wide:
        bad_limit = coords >= COORD_LIMIT
        bad = bad | bad_limit.any()
    if spatial_shape is not None:
        # Python-scalar comparisons: a limits tensor would cost a host-to-device copy (and a stream sync).
        bad_range = torch.stack([coords[:, 1] >= spatial_shape[0], coords[:, 2] >= spatial_shape[1]], 1)
        bad = bad | bad_range.any()
    if order_and_sign:
        c = coords.long()
        bad_sign = c < 0
        prev, cur = c[:-1], c[1:]
        ordered = (prev[:, 0] < cur[:, 0]) | (
            (prev[:, 0] == cur[:, 0])
            & ((prev[:, 1] < cur[:, 1]) | ((prev[:, 1] == cur[:, 1]) & (prev[:, 2] < cur[:, 2])))
        )
        bad = bad | bad_sign.any() | (~ordered).any()
    if not bool(bad):
        return
    c = coords.long()
    if wide and bad_limit.any():
        row = int(bad_limit.any(1).nonzero()[0])
        raise ValueError(
            f"coords must be below 2**62 (window arithmetic is int64), row {row} is {c[row].tolist()}"
        )
    if order_and_sign and bad_sign.any():
        row = int(bad_sign.any(1).nonzero()[0])
        raise ValueError(f"coords must be non-negative, row {row} is {c[row].tolist()}")
    if spatial_shape is not None and bad_range.any():
        row = int(bad_range.any(1).nonzero()[0])
        raise ValueError(
            f"coords must lie inside spatial_shape {tuple(spatial_shape)}, row {row} is {c[row].tolist()}"
        )
    row = int((~ordered).nonzero()[0])
    raise ValueError(
        "coords must be sorted lexicographically by (batch, y, x) without duplicates; "
        f"row {row} is {c[row].tolist()} and row {row + 1} is {c[row + 1].tolist()}"
    )


# --- the C++ ops' fake kernels and autograd, registered by the op contract ---------------------------


def argmax_dtype(kernel_size: Sequence[int]) -> torch.dtype:
    """The dtype of the kernels' argmax (window offsets in ``[0, ky * kx)``): the narrowest that holds
    them (csrc/sparse_max_pool2d_common.h, ``offset_dtype``)."""
    area = kernel_size[0] * kernel_size[1]
    if area <= 256:
        return torch.uint8
    if area <= 2**15:
        return torch.int16
    return torch.int32 if area <= 2**31 else torch.int64


def _forward_fake(coords, feats, kernel_size, stride, window_limit, coord_bound=(-1, -1)):
    m = torch.library.get_ctx().new_dynamic_size()
    slots = _windows_per_input(tuple(kernel_size), tuple(stride))
    offsets = argmax_dtype(kernel_size)
    return (
        coords.new_empty((m, 3)),
        feats.new_empty((m, feats.shape[1])),
        feats.new_empty((m, feats.shape[1]), dtype=offsets),
        feats.new_empty((feats.shape[0], slots), dtype=torch.int32),
        feats.new_empty((feats.shape[0],), dtype=offsets),
    )


def _setup_context(ctx, inputs, output):
    _, _, kernel_size, stride, *_ = inputs
    _, _, argmax, window_map, site_offset = output
    ctx.save_for_backward(argmax, window_map, site_offset)
    ctx.geometry = (list(kernel_size), list(stride))
    ctx.mark_non_differentiable(output[0], argmax, window_map, site_offset)


def _backward(ctx, backward_op, grad_coords, grad_feats, *_grad_tables):
    # The forward's own tables: the C++ op's range check (a host sync on CUDA) is skipped.
    argmax, window_map, site_offset = ctx.saved_tensors
    with trusted_native_calls(grad_feats):
        grad = backward_op(grad_feats.contiguous(), argmax, window_map, site_offset, *ctx.geometry)
    return None, grad, None, None, None, None


def _backward_op_reference(grad_out_feats, argmax, window_map, site_offset, kernel_size, stride):
    """The backward ops' definition: each input sums, over the windows that hold it (``window_map``),
    the gradients of the channels whose argmax is its offset in that window (``site_offset`` shifted
    by the slot). Linear in ``grad_out_feats``, so differentiable (the higher-order rule)."""
    kx, (sy, sx) = kernel_size[1], stride
    n, channels = window_map.shape[0], grad_out_feats.shape[1]
    grad = grad_out_feats.new_zeros((n, channels))
    if grad_out_feats.shape[0] == 0 or n == 0:
        return grad
    px = -(-kx // sx)
    ry, rx = site_offset.long() // kx, site_offset.long() % kx
    for slot in range(window_map.shape[1]):
        dy, dx = divmod(slot, px)
        window = window_map[:, slot].long()
        oy, ox = ry - dy * sy, rx - dx * sx
        held = (window >= 0) & (oy >= 0) & (ox >= 0)
        window = window.clamp(min=0)
        hit = (argmax[window].long() == (oy * kx + ox)[:, None]) & held[:, None]
        grad = grad + torch.where(hit, grad_out_feats[window], 0)
    return grad


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=lambda grad_out_feats, argmax, window_map, site_offset, kernel_size, stride: (
        grad_out_feats.new_empty((window_map.shape[0], grad_out_feats.shape[1]))
    ),
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_backward_op_reference,
    backward_differentiable=(0,),
)


def _check(
    coords: torch.Tensor,
    feats: torch.Tensor,
    kernel_size: IntPair = 2,
    stride: IntPair | None = None,
    spatial_shape: IntPair | None = None,
    check_coords: bool = True,
) -> tuple:
    check_tensor("coords", coords)
    check_tensor("feats", feats)
    check_dtype("coords", coords, COORD_DTYPES)
    check_dtype("feats", feats, FEAT_DTYPES)
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape [N, 3] (batch, y, x), got {list(coords.shape)}")
    if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"feats must have shape [N, C] with N = {coords.shape[0]} (coords' rows), got {list(feats.shape)}"
        )
    check_same_device(coords=coords, feats=feats)
    kernel, step, _ = _geometry(kernel_size, stride, spatial_shape)
    shape = None if spatial_shape is None else _pair("spatial_shape", spatial_shape)
    slots = _windows_per_input(kernel, step)
    if slots > _INT32_MAX or coords.shape[0] * slots > _INT32_MAX:
        raise ValueError("N * ceil(ky/sy) * ceil(kx/sx) must fit int32 (the window map is int32)")
    return coords, feats, kernel, step, shape, bool(check_coords)


def _validate(coords, shape, check_coords):
    if check_coords and not torch.compiler.is_compiling():
        _check_coords(coords, shape, order_and_sign=True)


def _run_reference(coords, feats, kernel, step, shape, check_coords):
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "sparse_max_pool2d: the reference backend cannot be traced by torch.compile or torch.export "
            "(its output size depends on the data at every step); the cpu and cuda backends (C++ "
            "extension) can. Build the extension, or run this op eagerly"
        )
    _validate(coords, shape, check_coords)
    return sparse_max_pool2d_reference(coords, feats, kernel, step, shape)


def _run_kernel(forward_op, coords, feats, kernel, step, shape, check_coords):
    # The C++ kernels check every coordinate themselves (the spatial_shape bound too, through
    # coord_bound) in passes they make anyway: no sync of their own besides the output count.
    limit = _geometry(kernel, step, shape)[2]
    bound = list(shape) if check_coords and shape is not None else [-1, -1]
    out_coords, out_feats, *_ = forward_op(coords, feats, list(kernel), list(step), list(limit), bound)
    return out_coords, out_feats


def _cost(coords, feats, kernel, step, shape, check_coords) -> OpCost:
    """Read feats and coords of the N inputs, write feats and coords of the M outputs (the argmax and
    window map the kernels save for backward are extra); no FLOPs (a max is a comparison). M comes
    from the reference on zero channels (its output sites only: a unique over the candidate windows)."""
    n, channels = feats.shape
    with torch.no_grad():
        m = sparse_max_pool2d_reference(coords, feats[:, :0], kernel, step, shape)[0].shape[0]
    s, i = feats.element_size(), coords.element_size()
    return OpCost(n * channels * s + 3 * n * i + m * channels * s + 3 * m * i, 0)


_native = KernelBackend(
    "sparse_max_pool2d_forward", "sparse_max_pool2d_backward", AUTOGRAD, native=True, call=_run_kernel
)
SPARSE_MAX_POOL2D = define_op(
    OpSpec(
        name="sparse_max_pool2d",
        cost=_cost,
        reference=_run_reference,
        check=_check,
        device=lambda coords, feats, *_: feats.device,
        kernels={"cpu": _native, "cuda": _native},
        gpu_order=("cuda",),
        cpu_order=("cpu",),
        dtypes=FEAT_DTYPES,
        reference_traceable=False,
        benchmark_module="fastvision.benchmark.sparse_max_pool2d",
    )
)


def sparse_max_pool2d(
    coords: torch.Tensor,
    feats: torch.Tensor,
    kernel_size: IntPair = 2,
    stride: IntPair | None = None,
    spatial_shape: IntPair | None = None,
    check_coords: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling over the active sites of a sparse 2-D map (see the module docstring).

    Args:
        coords: ``[N, 3]`` int32/int64 (batch, y, x), sorted lexicographically, unique, non-negative.
        feats: ``[N, C]`` float32/float16/bfloat16/float64, any strides.
        kernel_size: window size, an int or (ky, kx).
        stride: window step, an int or (sy, sx); defaults to ``kernel_size``.
        spatial_shape: (H, W) of the map: floor-mode extent like ``F.max_pool2d``; ``None`` keeps
            every window that holds an active site.
        check_coords: also check that coords lie inside ``spatial_shape``: the kernels in a pass they
            make anyway (no extra sync); the reference backend in Python, with its sign and order check
            (which the kernels always make), one host sync on CUDA, skipped while torch.compile/export
            trace.

    Returns:
        ``(out_coords [M, 3], out_feats [M, C])``: ``coords``' and ``feats``' dtypes, canonical order.
    """
    return SPARSE_MAX_POOL2D(coords, feats, kernel_size, stride, spatial_shape, check_coords)
