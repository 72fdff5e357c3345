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
``sparse_max_pool2d_backward`` (schema in csrc/sparse_max_pool2d.cpp) get a fake kernel with a
data-dependent output size and autograd here, so torch.compile / torch.export see one opaque op.
The forward returns, besides the pooled map, the argmax ``[M, C]`` int32 and a ``window_map [N, P]``
int32 (for each input, the output row of each of the ``P = ceil(ky/sy) * ceil(kx/sx)`` windows that can
hold it, or -1); the backward gathers with them: no atomics, deterministic, no host synchronization.

Validation (``ValueError``): the C++ kernels always check that coords are non-negative and in canonical
order, at no extra cost (the CPU kernel in its first pass over the coords; the CUDA kernel raises a flag
that it reads back with the output count). ``check_coords=True`` adds, in Python, the check that coords
lie inside ``spatial_shape`` (when given) and, for the reference backend, the sign and order check; on
CUDA tensors that costs one host synchronization. It is skipped while torch.compile / torch.export
trace. With ``check_coords=False`` the reference pools whatever it is given, and the kernels ignore sites
outside ``spatial_shape`` (no window inside the map holds them).

Host synchronizations: the C++ forward syncs once (for the output count, which sizes the outputs); the
backward never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastvision._backend import select_backend
from fastvision._extension import has_kernel
from fastvision.ops._checks import check_dtype, check_same_device, check_tensor

COORD_DTYPES = (torch.int32, torch.int64)
# Max pooling does no arithmetic, so float64 costs nothing extra (and makes gradcheck possible).
FEAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPP_OPS_BUILT = has_kernel("sparse_max_pool2d_forward", "CPU")
IMPLEMENTED_BACKENDS = ("reference", "cpu", "cuda") if CPP_OPS_BUILT else ("reference",)
GPU_ORDER = ("cuda",)
_INT32_MAX = 2**31 - 1

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
    """Inside spatial_shape, and (order_and_sign) non-negative, sorted and unique: at most one host sync."""
    if spatial_shape is None and not order_and_sign:
        return
    bad = torch.zeros((), dtype=torch.bool, device=coords.device)
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


# --- fake kernels and autograd for the C++ ops ----------------------------------------------------


def _register() -> None:
    backward_op = torch.ops.fastvision.sparse_max_pool2d_backward.default

    @torch.library.register_fake("fastvision::sparse_max_pool2d_forward")
    def _forward_fake(coords, feats, kernel_size, stride, window_limit):
        m = torch.library.get_ctx().new_dynamic_size()
        slots = _windows_per_input(tuple(kernel_size), tuple(stride))
        return (
            coords.new_empty((m, 3)),
            feats.new_empty((m, feats.shape[1])),
            feats.new_empty((m, feats.shape[1]), dtype=torch.int32),
            feats.new_empty((feats.shape[0], slots), dtype=torch.int32),
        )

    @torch.library.register_fake("fastvision::sparse_max_pool2d_backward")
    def _backward_fake(grad_out_feats, argmax, window_map):
        return grad_out_feats.new_empty((window_map.shape[0], grad_out_feats.shape[1]))

    def setup_context(ctx, inputs, output):
        _, _, argmax, window_map = output
        ctx.save_for_backward(argmax, window_map)

    def backward_fn(ctx, grad_coords, grad_feats, grad_argmax, grad_window_map):
        argmax, window_map = ctx.saved_tensors
        return None, backward_op(grad_feats, argmax, window_map), None, None, None

    torch.library.register_autograd(
        "fastvision::sparse_max_pool2d_forward", backward_fn, setup_context=setup_context
    )


if CPP_OPS_BUILT:
    _register()


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
        check_coords: also check in Python that coords lie inside ``spatial_shape`` (and, for the
            reference backend, their sign and order; the kernels always check those): one host sync on
            CUDA when there is something to check; skipped while torch.compile/export trace.

    Returns:
        ``(out_coords [M, 3], out_feats [M, C])``: ``coords``' and ``feats``' dtypes, canonical order.
    """
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
    kernel, step, limit = _geometry(kernel_size, stride, spatial_shape)
    if coords.shape[0] * _windows_per_input(kernel, step) > _INT32_MAX:
        raise ValueError("N * ceil(ky/sy) * ceil(kx/sx) must fit int32 (the argmax and window map are int32)")
    backend = select_backend("sparse_max_pool2d", feats.device, IMPLEMENTED_BACKENDS, GPU_ORDER)
    if check_coords and not torch.compiler.is_compiling():
        shape = None if spatial_shape is None else _pair("spatial_shape", spatial_shape)
        # The C++ kernels check sign and order themselves, without a sync of their own.
        _check_coords(coords, shape, order_and_sign=backend == "reference")
    if backend == "reference":
        return sparse_max_pool2d_reference(coords, feats, kernel, step, spatial_shape)
    out_coords, out_feats, _, _ = torch.ops.fastvision.sparse_max_pool2d_forward(
        coords, feats, list(kernel), list(step), list(limit)
    )
    return out_coords, out_feats
