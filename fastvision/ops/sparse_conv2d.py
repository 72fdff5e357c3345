"""Submanifold sparse 2-D convolution: outputs at the active input sites only.

``out[o] = bias + sum over kernel offsets k, over pairs (i, o) of k:  feats[i] @ weight[k]``, with the
pairs from a :class:`~fastvision.sparse.KernelMap` (``SparseTensor.kernel_map(K)``).

Definition (``sparse_conv2d_reference``): densify, ``F.conv2d`` with ``padding = K // 2``, read the
result at the active sites. The dense convolution sees zeros at the inactive sites, which is the
same as skipping them, so the two agree exactly up to rounding.

Backends:

* ``reference``: here the gather -> GEMM -> scatter-add formulation in plain torch ops
  (``index_select``, ``mm``, ``index_add_``), one GEMM per kernel offset over the map's pairs; it
  runs on any device and never densifies (the dense definition above is only for checking). It is
  the custom op ``fastvision::sparse_conv2d_gather_gemm`` with an explicit backward, so autograd
  saves only the features and weight (not the gathered rows) and torch.compile / torch.export see
  one op.
* ``triton``: triton_kernels/sparse_conv2d.py, an implicit GEMM over the map's neighbour table: rows
  gathered through the table straight into ``tl.dot`` (wgmma for 16-bit inputs), offsets absent
  from a whole site tile skipped, no scatter and no atomics in any pass (the weight gradient sums
  per-chunk partials in a fixed order); float32 (IEEE products, TF32 when
  ``torch.get_float32_matmul_precision()`` allows it)/float16/bfloat16.
* ``cpu``: csrc/cpu/sparse_conv2d.cpp, the same neighbour-table form in C++: blocks of output sites
  per thread, per offset only the present pairs, at::vec register-tiled multiply-adds into float
  (double for float64) accumulators, the input gradient over the mirrored offsets of the symmetric
  map, the weight gradient as per-(site chunk, offset) partial sums added in a fixed order (no
  atomics; bit-identical for any thread count). The CPU default when the extension is built.

There is no CUDA C++ kernel. The op contract (``fastvision/ops/_contract.py``)
registers both pairs' fake kernels and autograd; ``torch.func`` transforms and forward-mode AD run
``sparse_conv2d_pairs_reference``, the same gather -> GEMM -> scatter in differentiable torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision.ops._checks import FLOAT_DTYPES, check_dtype, check_tensor
from fastvision.ops._contract import (
    AutogradRule,
    KernelBackend,
    OpCost,
    OpSpec,
    define_op,
    leaf,
    only_dtypes,
    triton_launch,
)
from fastvision.sparse.kernel_map import KernelMap, check_neighbor_table, check_pair_lists
from fastvision.sparse.tensor import SparseTensor

# float64 too: the torch-ops path supports it, and gradcheck needs it.
SUPPORTED_DTYPES = (*FLOAT_DTYPES, torch.float64)


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[K*K, Cin, Cout]`` sparse layout -> ``[Cout, Cin, K, K]`` (``nn.Conv2d`` layout)."""
    kernel_size = round(weight.shape[0] ** 0.5)
    return weight.reshape(kernel_size, kernel_size, weight.shape[1], weight.shape[2]).permute(3, 2, 0, 1)


def sparse_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, K, K]`` (``nn.Conv2d`` layout) -> ``[K*K, Cin, Cout]`` sparse layout."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout)


def sparse_conv2d_reference(
    x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dilation: int = 1
) -> torch.Tensor:
    """The definition: dense ``F.conv2d`` of ``x.to_dense()``, read at the active sites -> ``[N, Cout]``."""
    kernel_size = round(weight.shape[0] ** 0.5)
    dense = F.conv2d(
        x.to_dense(), dense_weight(weight), bias, padding=(kernel_size // 2) * dilation, dilation=dilation
    )
    coords = x.coords
    return dense.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]


# --- gather -> GEMM -> scatter-add, as custom ops ----------------------------------------------------


def _accumulator(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    # Half-precision products are summed over the offsets in float32 and rounded once at the end.
    return like.new_zeros((rows, cols), dtype=torch.promote_types(like.dtype, torch.float32))


def _offset_ranges(offset_starts: torch.Tensor, num_sites: int) -> list[tuple[int, int, int, bool]]:
    """``(offset, start, end, identity)`` per offset with pairs. The centre offset of a submanifold
    map pairs every site with itself, in order (build_kernel_map): no gather or scatter needed."""
    starts = offset_starts.tolist()
    center = (len(starts) - 1) // 2
    return [
        (k, starts[k], starts[k + 1], k == center and starts[k + 1] - starts[k] == num_sites)
        for k in range(len(starts) - 1)
        if starts[k + 1] > starts[k]
    ]


def _check_kernel_args(op, feats, weight, grad_out=None):
    """The shapes a registered op's kernel reads through (the public op checked them already; a
    direct ``torch.ops.fastvision`` call did not)."""
    if feats.dim() != 2 or weight.dim() != 3 or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"{op}: feats must be [N, Cin] and weight [K*K, Cin, Cout], got {tuple(feats.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if grad_out is not None and grad_out.shape != (feats.shape[0], weight.shape[2]):
        raise ValueError(
            f"{op}: grad_out must have shape [N, Cout] = [{feats.shape[0]}, {weight.shape[2]}], "
            f"got {tuple(grad_out.shape)}"
        )


def _check_pairs_op(op, feats, in_indices, out_indices, offset_starts, weight, grad_out=None):
    _check_kernel_args(op, feats, weight, grad_out)
    check_pair_lists(in_indices, out_indices, offset_starts, feats.shape[0], weight.shape[0], op=op)


@torch.library.custom_op("fastvision::sparse_conv2d_gather_gemm", mutates_args=())
def sparse_conv2d_gather_gemm(
    feats: torch.Tensor,
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    offset_starts: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    _check_pairs_op("sparse_conv2d_gather_gemm", feats, in_indices, out_indices, offset_starts, weight)
    out = _accumulator(feats.shape[0], weight.shape[2], feats)
    for k, start, end, identity in _offset_ranges(offset_starts, feats.shape[0]):
        if identity:
            out += torch.mm(feats, weight[k])
            continue
        rows = feats.index_select(0, in_indices[start:end])
        out.index_add_(0, out_indices[start:end], torch.mm(rows, weight[k]).to(out.dtype))
    return out.to(feats.dtype)


@torch.library.custom_op("fastvision::sparse_conv2d_gather_gemm_backward", mutates_args=())
def sparse_conv2d_gather_gemm_backward(
    grad_out: torch.Tensor,
    feats: torch.Tensor,
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    offset_starts: torch.Tensor,
    weight: torch.Tensor,
    need_feats_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pairs_op(
        "sparse_conv2d_gather_gemm_backward", feats, in_indices, out_indices, offset_starts, weight, grad_out
    )
    grad_out = grad_out.contiguous()
    grad_feats = _accumulator(feats.shape[0], feats.shape[1], feats) if need_feats_grad else None
    grad_weight = _accumulator(weight.shape[0], weight.shape[1] * weight.shape[2], weight)
    grad_weight = grad_weight.view(weight.shape) if need_weight_grad else None
    for k, start, end, identity in _offset_ranges(offset_starts, feats.shape[0]):
        if identity:
            if grad_feats is not None:
                grad_feats += torch.mm(grad_out, weight[k].t())
            if grad_weight is not None:
                grad_weight[k] += torch.mm(feats.t(), grad_out)
            continue
        src, dst = in_indices[start:end], out_indices[start:end]
        grad_rows = grad_out.index_select(0, dst)
        if grad_feats is not None:
            # d feats[i] += grad_out[o] @ weight[k]^T : the same pairs, scattered the other way.
            grad_feats.index_add_(0, src, torch.mm(grad_rows, weight[k].t()).to(grad_feats.dtype))
        if grad_weight is not None:
            grad_weight[k] += torch.mm(feats.index_select(0, src).t(), grad_rows).to(grad_weight.dtype)
    return (
        grad_feats.to(feats.dtype) if grad_feats is not None else feats.new_empty(0),
        grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
    )


def _pairs_forward_fake(feats, in_indices, out_indices, offset_starts, weight):
    return feats.new_empty((feats.shape[0], weight.shape[2]))


def _pairs_backward_fake(grad_out, feats, in_indices, out_indices, offset_starts, weight, need_feats_grad,
                         need_weight_grad):  # fmt: skip
    return (
        feats.new_empty(feats.shape if need_feats_grad else (0,)),
        weight.new_empty(weight.shape if need_weight_grad else (0,)),
    )


def _setup_context(ctx, inputs, output):
    feats, in_indices, out_indices, offset_starts, weight = inputs
    ctx.save_for_backward(feats, in_indices, out_indices, offset_starts, weight)


def _backward(ctx, backward_op, grad_out):
    feats, in_indices, out_indices, offset_starts, weight = ctx.saved_tensors
    need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    grad_feats, grad_weight = backward_op(
        grad_out, feats, in_indices, out_indices, offset_starts, weight, need_feats, need_weight
    )
    return (
        grad_feats if need_feats else None,
        None,
        None,
        None,
        grad_weight if need_weight else None,
    )


def sparse_conv2d_pairs_reference(feats, in_indices, out_indices, offset_starts, weight):
    """The gather -> GEMM -> scatter-add of the pair ops in differentiable torch ops."""
    out = _accumulator(feats.shape[0], weight.shape[2], feats)
    for k, start, end, _ in _offset_ranges(offset_starts, feats.shape[0]):
        rows = feats.index_select(0, in_indices[start:end])
        out = out.index_add(0, out_indices[start:end], torch.mm(rows, weight[k]).to(out.dtype))
    return out.to(feats.dtype)


def _vjp(forward, grad_out, inputs, needs):
    """``(grad_feats, grad_weight)`` of ``forward`` by autograd, ``[0]`` where not needed."""
    with torch.enable_grad():
        leaves = [leaf(t) for t in inputs]
        out = forward(*leaves)
        wanted = [t for t, need in zip(leaves, needs, strict=True) if need]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True) if wanted else ())
    return tuple(next(found) if need else t.new_empty(0) for t, need in zip(inputs, needs, strict=True))


def _pairs_backward_reference(
    grad_out, feats, in_indices, out_indices, offset_starts, weight, need_feats_grad, need_weight_grad
):
    def forward(f, w):
        return sparse_conv2d_pairs_reference(f, in_indices, out_indices, offset_starts, w)

    return _vjp(forward, grad_out, (feats, weight), (need_feats_grad, need_weight_grad))


PAIRS_AUTOGRAD = AutogradRule(
    forward_fake=_pairs_forward_fake,
    backward_fake=_pairs_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_pairs_backward_reference,
    backward_differentiable=(0, 1, 5),
)


# --- Triton backend, wrapped as custom ops ----------------------------------------------------------


@triton_launch("sparse_conv2d_triton_forward")
def sparse_conv2d_triton_forward(
    feats: torch.Tensor, neighbors: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    from fastvision.triton_kernels.sparse_conv2d import gather_gemm

    return gather_gemm(feats, neighbors, weight)


@triton_launch("sparse_conv2d_triton_backward")
def sparse_conv2d_triton_backward(
    grad_out: torch.Tensor,
    feats: torch.Tensor,
    neighbors: torch.Tensor,
    weight: torch.Tensor,
    need_feats_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.sparse_conv2d import gather_gemm, mirrored_weight, weight_grad

    grad_feats = gather_gemm(grad_out, neighbors, mirrored_weight(weight)) if need_feats_grad else None
    grad_weight = weight_grad(feats, neighbors, grad_out, weight.shape[0]) if need_weight_grad else None
    return (
        grad_feats if grad_feats is not None else feats.new_empty(0),
        grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
    )


def _check_triton_dtypes(feats, weight, grad_out=None) -> None:
    """Floating data of one dtype the kernels take (integers would give numbers, float64 has no
    kernel)."""
    check_tensor("feats", feats)
    check_tensor("weight", weight)
    check_dtype("feats", feats, FLOAT_DTYPES)
    named = {"weight": weight} if grad_out is None else {"weight": weight, "grad_out": grad_out}
    for name, tensor in named.items():
        check_tensor(name, tensor)
        if tensor.dtype != feats.dtype:
            raise TypeError(f"{name} must have feats' dtype {feats.dtype}, got {tensor.dtype}")


def _check_forward_op(feats, neighbors, weight) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them."""
    op = "sparse_conv2d_triton_forward"
    _check_triton_dtypes(feats, weight)
    _check_kernel_args(op, feats, weight)
    check_neighbor_table(neighbors, feats.shape[0], weight.shape[0], op=op)


def _check_backward_op(grad_out, feats, neighbors, weight, need_feats_grad, need_weight_grad) -> None:
    """The backward op's own arguments: the forward's and grad_out of the output's shape and dtype."""
    op = "sparse_conv2d_triton_backward"
    _check_triton_dtypes(feats, weight, grad_out)
    _check_kernel_args(op, feats, weight, grad_out)
    # The input gradient runs the forward kernel over the mirrored offsets: it needs a symmetric map.
    check_neighbor_table(neighbors, feats.shape[0], weight.shape[0], symmetric=need_feats_grad, op=op)


def _neighbors_forward_fake(feats, neighbors, weight):
    return feats.new_empty((feats.shape[0], weight.shape[2]))


def _neighbors_backward_fake(grad_out, feats, neighbors, weight, need_feats_grad, need_weight_grad):
    return (
        feats.new_empty(feats.shape if need_feats_grad else (0,)),
        weight.new_empty(weight.shape if need_weight_grad else (0,)),
    )


def _triton_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _triton_backward(ctx, backward_op, grad_out):
    feats, neighbors, weight = ctx.saved_tensors
    need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_feats, grad_weight = backward_op(grad_out, feats, neighbors, weight, need_feats, need_weight)
    return (grad_feats if need_feats else None, None, grad_weight if need_weight else None)


def _neighbors_reference(feats, neighbors, weight):
    """``out[o] = sum_k feats[neighbors[o, k]] @ weight[k]`` (``-1``: no input) in torch ops."""
    present = neighbors >= 0
    rows = feats[neighbors.clamp_min(0).long()] * present.unsqueeze(-1).to(feats.dtype)  # [N, K*K, Cin]
    compute = torch.promote_types(feats.dtype, torch.float32)
    return torch.einsum("nki,kio->no", rows.to(compute), weight.to(compute)).to(feats.dtype)


def _neighbors_backward_reference(grad_out, feats, neighbors, weight, need_feats_grad, need_weight_grad):
    def forward(f, w):
        return _neighbors_reference(f, neighbors, w)

    return _vjp(forward, grad_out, (feats, weight), (need_feats_grad, need_weight_grad))


NEIGHBORS_AUTOGRAD = AutogradRule(
    forward_fake=_neighbors_forward_fake,
    backward_fake=_neighbors_backward_fake,
    setup_context=_triton_setup_context,
    backward=_triton_backward,
    backward_reference=_neighbors_backward_reference,
    backward_differentiable=(0, 1, 3),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


def _check(
    feats: torch.Tensor,
    kernel_map: KernelMap,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple:
    check_tensor("feats", feats)
    check_tensor("weight", weight)
    if not isinstance(kernel_map, KernelMap):
        raise TypeError(
            f"kernel_map must be a KernelMap (SparseTensor.kernel_map(...)), got {type(kernel_map).__name__}"
        )
    # Its values were validated when it was made; the structure is re-checked here (no host sync).
    kernel_map.check_structure()
    check_dtype("feats", feats, SUPPORTED_DTYPES)
    if weight.dtype != feats.dtype:
        raise TypeError(f"weight must have feats' dtype {feats.dtype}, got {weight.dtype}")
    if feats.dim() != 2:
        raise ValueError(f"feats must have shape [N, Cin], got {tuple(feats.shape)}")
    if feats.shape[0] != kernel_map.num_sites:
        raise ValueError(
            f"feats has {feats.shape[0]} rows but kernel_map was built for "
            f"{kernel_map.num_sites} active sites"
        )
    if weight.dim() != 3 or weight.shape[0] != kernel_map.num_offsets or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"weight must have shape [K*K, Cin, Cout] = [{kernel_map.num_offsets}, {feats.shape[1]}, Cout] "
            f"for kernel_size {kernel_map.kernel_size} and {feats.shape[1]} input channels, "
            f"got {tuple(weight.shape)}"
        )
    if feats.device != weight.device or feats.device != kernel_map.in_indices.device:
        raise ValueError(
            f"feats, weight and kernel_map must be on one device, got {feats.device}, {weight.device} "
            f"and {kernel_map.in_indices.device}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[2],) or bias.dtype != feats.dtype or bias.device != feats.device:
            raise ValueError(
                f"bias must be a [{weight.shape[2]}] tensor of dtype {feats.dtype} on {feats.device}, "
                f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
            )
    return feats, kernel_map, weight, bias


def _with_bias(out, bias):
    return out if bias is None else out + bias


def _run_pairs(forward_op, feats, kernel_map, weight, bias):
    km = kernel_map
    return _with_bias(forward_op(feats, km.in_indices, km.out_indices, km.offset_starts, weight), bias)


def _run_neighbors(forward_op, feats, kernel_map, weight, bias):
    # The table kernels index feats through it: a map made with check=False is checked once here.
    if not torch.compiler.is_compiling():
        kernel_map.check_table()
    return _with_bias(forward_op(feats, kernel_map.neighbors, weight), bias)


def sparse_conv2d_onnx():
    """The neighbour-table form ``(feats, neighbors, weight)`` in standard ONNX operators: Gather of
    each site's ``K*K`` neighbour rows (absent ones read a zero row), then one MatMul with the
    ``[K*K*Cin, Cout]`` weight. The kernel map's tensors are inputs or constants of the graph."""
    from onnxscript import INT64
    from onnxscript import opset18 as op

    def sparse_conv2d(feats, neighbors, weight):
        channels = op.Shape(feats, start=1, end=2)
        row_shape = op.Concat(op.Constant(value_ints=[1]), channels, axis=0)
        zero_row = op.Expand(op.CastLike(0.0, feats), row_shape)
        padded = op.Concat(zero_row, feats, axis=0)  # row 0 stands for "no neighbour" (-1)
        index = op.Add(op.Cast(neighbors, to=INT64.dtype), op.Constant(value_int=1))
        rows = op.Gather(padded, index, axis=0)  # [N, K*K, Cin]
        flat = op.Reshape(rows, op.Constant(value_ints=[0, -1]))
        out_channels = op.Shape(weight, start=2, end=3)
        matrix = op.Reshape(weight, op.Concat(op.Constant(value_ints=[-1]), out_channels, axis=0))
        return op.MatMul(flat, matrix)

    return sparse_conv2d


def _transform_reference(feats, kernel_map, weight, bias):
    km = kernel_map
    out = sparse_conv2d_pairs_reference(feats, km.in_indices, km.out_indices, km.offset_starts, weight)
    return _with_bias(out, bias)


def _cost(feats, kernel_map, weight, bias) -> OpCost:
    """Read feats, weight, bias and the P int64 index pairs once, write [N, Cout]; 2 P Cin Cout FLOPs
    (a multiply-add per kernel-map pair and channel pair; the bias add is not counted)."""
    pairs = kernel_map.in_indices.numel()
    _, cin, cout = weight.shape
    element = feats.element_size()
    moved = (feats.numel() + weight.numel() + feats.shape[0] * cout) * element + 16 * pairs
    if bias is not None:
        moved += bias.numel() * element
    return OpCost(moved, 2 * pairs * cin * cout)


SPARSE_CONV2D = define_op(
    OpSpec(
        name="sparse_conv2d",
        cost=_cost,
        reference=_transform_reference,
        check=_check,
        device=lambda feats, *_: feats.device,
        kernels={
            "reference": KernelBackend(
                "sparse_conv2d_gather_gemm",
                "sparse_conv2d_gather_gemm_backward",
                PAIRS_AUTOGRAD,
                call=_run_pairs,
            ),
            "triton": KernelBackend(
                "sparse_conv2d_triton_forward",
                "sparse_conv2d_triton_backward",
                NEIGHBORS_AUTOGRAD,
                supports=only_dtypes("triton", FLOAT_DTYPES),
                call=_run_neighbors,
                onnx=sparse_conv2d_onnx,
            ),
            "cpu": KernelBackend(
                "sparse_conv2d_forward",
                "sparse_conv2d_backward",
                NEIGHBORS_AUTOGRAD,
                call=_run_neighbors,
                native=True,
            ),
        },
        # Not yet measured on a GPU: Triton is the only GPU kernel, and it fuses what the reference
        # does in 3 launches per offset.
        gpu_order=("triton",),
        # Measured on the 2-core CPU (one process, interleaved medians; README): the C++ kernel
        # runs 3.0-5.4x the reference forward and 2.1-3.4x forward+backward at the benchmark's CPU sizes
        # (1x64x64, 32 channels), 1.8-2.7x at 256x256 with one thread.
        cpu_order=("cpu",),
        dtypes=SUPPORTED_DTYPES,
        triton_module="fastvision.triton_kernels.sparse_conv2d",
        benchmark_module="fastvision.benchmark.sparse_conv2d",
    )
)


def sparse_conv2d(
    feats: torch.Tensor,
    kernel_map: KernelMap,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Submanifold sparse convolution of the features of one :class:`~fastvision.sparse.SparseTensor`.

    Args:
        feats: ``[N, Cin]`` float32/float16/bfloat16/float64 features at the active sites (canonical order).
        kernel_map: ``x.kernel_map(K, dilation)`` of the tensor the features belong to.
        weight: ``[K*K, Cin, Cout]`` of ``feats``' dtype; offset ``k = (dy + K//2) * K + (dx + K//2)``
            (``sparse_weight`` converts an ``nn.Conv2d`` weight).
        bias: optional ``[Cout]``.

    Returns:
        ``[N, Cout]`` output features at the same sites, ``feats``' dtype.
    """
    return SPARSE_CONV2D(feats, kernel_map, weight, bias)
