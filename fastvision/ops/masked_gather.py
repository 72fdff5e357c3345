"""Masked gather: the features of each sample's masked sites, packed into fixed-size slots.

``masked_gather(x [B, C, H, W], mask [B, H, W] bool, max_count=None)`` returns
``MaskedGather(values [B, M, C], indices [B, M, 2] int64 (h, w), valid [B, M] bool, counts [B] int64)``.
The sites of one sample fill its slots in row-major order (h, then w); slots past a sample's count
hold values 0, indices -1 and valid False; ``counts`` is the true number of True sites of each
sample, so truncation shows as ``counts > M``. ``M = max_count`` when given (the kernels then never
synchronize with the host); otherwise the largest count in the batch (one synchronization).

Backward: the gradient of each valid slot lands at its site of a zero ``[B, C, H, W]`` tensor. Each
slot has its own site, so there are no atomics and the result is deterministic.

Backends: ``reference`` (below: the vectorized nonzero + cumsum + advanced-indexing formulation),
``cpu`` (csrc/cpu/masked_gather.cpp), ``triton`` (triton_kernels/masked_gather.py), ``cuda``
(csrc/cuda/masked_gather.cu). The forward ops return ``(values, sites, valid, counts)``
with ``sites [B, M]`` int64 the flat site ``h * W + w`` of each slot (-1 past the count), from
which the public op derives ``indices``; the backward ops take ``(grad_values, sites, height,
width)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastvision.ops._checks import check_dtype, check_index_range, check_same_device, check_tensor
from fastvision.ops._contract import AutogradRule, KernelBackend, OpCost, OpSpec, define_op, triton_launch
from fastvision.ops._native_trust import trusted_native_calls


class MaskedGather(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor


def masked_gather_reference(
    x: torch.Tensor, mask: torch.Tensor, max_count: int | None = None
) -> MaskedGather:
    """The definition, vectorized as in the seed: nonzero, a per-sample cumsum, advanced indexing."""
    batch, channels = x.shape[:2]
    counts = mask.flatten(1).sum(1)
    slots = int(counts.max()) if max_count is None and batch > 0 else (max_count or 0)
    b, h, w = mask.nonzero(as_tuple=True)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(b.numel(), device=x.device) - starts[b]
    keep = slot < slots
    b, h, w, slot = b[keep], h[keep], w[keep], slot[keep]
    values = x.new_zeros((batch, slots, channels))
    values = values.index_put((b, slot), x[b, :, h, w])
    indices = torch.full((batch, slots, 2), -1, dtype=torch.int64, device=x.device)
    indices[b, slot, 0] = h
    indices[b, slot, 1] = w
    valid = torch.zeros((batch, slots), dtype=torch.bool, device=x.device)
    valid[b, slot] = True
    return MaskedGather(values, indices, valid, counts)


def masked_gather_loop_reference(
    x: torch.Tensor, mask: torch.Tensor, max_count: int | None = None
) -> MaskedGather:
    """The per-sample loop the vectorized forms replace (the slow baseline of the benchmark)."""
    batch, channels = x.shape[:2]
    counts = mask.flatten(1).sum(1)
    slots = int(counts.max()) if max_count is None and batch > 0 else (max_count or 0)
    values = x.new_zeros((batch, slots, channels))
    indices = torch.full((batch, slots, 2), -1, dtype=torch.int64, device=x.device)
    valid = torch.zeros((batch, slots), dtype=torch.bool, device=x.device)
    for i in range(batch):
        positions = mask[i].nonzero()[:slots]
        n = positions.shape[0]
        if n:
            values[i, :n] = x[i, :, positions[:, 0], positions[:, 1]].t()
            indices[i, :n] = positions
            valid[i, :n] = True
    return MaskedGather(values, indices, valid, counts)


def masked_gather_backward_reference(
    grad_values: torch.Tensor, sites: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The backward ops' definition: each valid slot's gradient at its site of a zero ``[B, C, H, W]``.
    Linear in ``grad_values`` (the higher-order rule differentiates it)."""
    batch, _, channels = grad_values.shape
    flat = grad_values.new_zeros((batch, height * width + 1, channels))
    target = torch.where(sites >= 0, sites, height * width)  # past-the-count slots land in a dump row
    flat = flat.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, channels), grad_values)
    return flat[:, : height * width].transpose(1, 2).reshape(batch, channels, height, width)


# --- kernel ops --------------------------------------------------------------------------------------


@triton_launch("masked_gather_triton_forward")
def masked_gather_triton_forward(
    x: torch.Tensor, mask: torch.Tensor, max_count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.masked_gather import masked_gather_forward

    return masked_gather_forward(x, mask, max_count)


@triton_launch("masked_gather_triton_backward")
def masked_gather_triton_backward(
    grad_values: torch.Tensor, sites: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    from fastvision.triton_kernels.masked_gather import masked_gather_backward

    return masked_gather_backward(grad_values, sites, height, width)


def _check_forward_op(x, mask, max_count) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them: the public checks."""
    _check(x, mask, max_count)


def _check_backward_op(grad_values, sites, height, width) -> None:
    """The backward op's own arguments: shapes and types (as csrc/masked_gather_common.h checks them
    for the C++ ops) and sites in ``[0, H * W)`` or -1 (an empty slot). Only a direct call pays this
    check's host sync: the public op's backward passes its forward's own sites, unchecked, so the
    ``max_count`` path stays sync-free."""
    check_tensor("grad_values", grad_values)
    check_tensor("sites", sites)
    check_dtype("grad_values", grad_values)
    if grad_values.dim() != 3:
        raise ValueError(f"grad_values must be [B, M, C], got shape {list(grad_values.shape)}")
    if sites.dtype != torch.int64 or list(sites.shape) != list(grad_values.shape[:2]):
        raise ValueError(
            f"sites must be int64 of shape {list(grad_values.shape[:2])} (grad_values' [B, M]), got "
            f"{sites.dtype} {list(sites.shape)}"
        )
    check_same_device(grad_values=grad_values, sites=sites)
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{name} must be a non-negative int, got {size!r}")
    if height * width > 2**31 - 1:
        raise ValueError(f"height * width must fit int32, got {height} x {width}")
    check_index_range("sites", sites, height * width, absent=-1)


def _forward_fake(x, mask, max_count):
    batch, channels = x.shape[:2]
    return (
        x.new_empty((batch, max_count, channels)),
        x.new_empty((batch, max_count), dtype=torch.int64),
        x.new_empty((batch, max_count), dtype=torch.bool),
        x.new_empty((batch,), dtype=torch.int64),
    )


def _backward_fake(grad_values, sites, height, width):
    batch, _, channels = grad_values.shape
    return grad_values.new_empty((batch, channels, height, width))


def _setup_context(ctx, inputs, output):
    x, _mask, _max_count = inputs
    _values, sites, valid, counts = output
    ctx.save_for_backward(sites)
    ctx.height, ctx.width = x.shape[2], x.shape[3]
    ctx.mark_non_differentiable(sites, valid, counts)


def _backward(ctx, backward_op, grad_values, _grad_sites, _grad_valid, _grad_counts):
    # The forward's own sites: the C++ op's range check (a host sync on CUDA) is skipped.
    (sites,) = ctx.saved_tensors
    with trusted_native_calls(grad_values):
        return backward_op(grad_values.contiguous(), sites, ctx.height, ctx.width), None, None


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=masked_gather_backward_reference,
    backward_differentiable=(0,),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


def _check(x: torch.Tensor, mask: torch.Tensor, max_count: int | None = None) -> tuple:
    check_tensor("x", x)
    check_tensor("mask", mask)
    check_dtype("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {list(x.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True where a site is gathered), got {mask.dtype}")
    expected = [x.shape[0], x.shape[2], x.shape[3]]
    if list(mask.shape) != expected:
        raise ValueError(f"mask must have shape [B, H, W] = {expected} (x's batch and spatial sizes), "
                         f"got {list(mask.shape)}")  # fmt: skip
    check_same_device(x=x, mask=mask)
    if max_count is not None:
        if isinstance(max_count, bool) or not isinstance(max_count, int):
            raise TypeError(f"max_count must be an int or None, got {type(max_count).__name__}")
        if not 0 <= max_count <= 2**31 - 1:
            raise ValueError(f"max_count must be in [0, 2**31 - 1], got {max_count}")
    if x.shape[2] * x.shape[3] > 2**31 - 1:
        raise ValueError(f"H * W must fit int32, got {x.shape[2]} x {x.shape[3]}")
    return x, mask, max_count


def _run_kernel(forward_op, x, mask, max_count):
    if max_count is None:
        # One synchronization, for the slot count.
        max_count = int(mask.flatten(1).sum(1).max()) if x.shape[0] > 0 else 0
    values, sites, valid, counts = forward_op(x, mask, max_count)
    width = x.shape[3]
    rows, cols = torch.div(sites, width, rounding_mode="floor"), torch.remainder(sites, width)
    indices = torch.stack([rows, cols], dim=-1).masked_fill(~valid.unsqueeze(-1), -1)
    return MaskedGather(values, indices, valid, counts)


_native = KernelBackend(
    "masked_gather_forward", "masked_gather_backward", AUTOGRAD, native=True, call=_run_kernel
)
def _cost(x, mask, max_count) -> OpCost:
    """Read the mask (B S) and the n gathered sites' C channels once, write B M slots of values, int64
    sites and bool validity, and B int64 counts (M = max_count, else the largest count); no FLOPs.
    Counts the mask: one reduction and one host sync (the profiler's per-call record pays them)."""
    batch, channels = x.shape[:2]
    counts = mask.flatten(1).sum(1)
    gathered = int(counts.sum()) if batch else 0
    slots = max_count if max_count is not None else (int(counts.max()) if batch else 0)
    element = x.element_size()
    moved = mask.numel() + gathered * channels * element + batch * slots * (channels * element + 9)
    return OpCost(moved + 8 * batch, 0)


MASKED_GATHER = define_op(
    OpSpec(
        name="masked_gather",
        cost=_cost,
        reference=masked_gather_reference,
        check=_check,
        device=lambda x, *_: x.device,
        kernels={
            "cpu": _native,
            "cuda": _native,
            "triton": KernelBackend(
                "masked_gather_triton_forward", "masked_gather_triton_backward", AUTOGRAD, call=_run_kernel
            ),
        },
        # Not yet measured on a GPU: the CUDA kernel's scan is one block per sample with warp ballots,
        # Triton's a tl.cumsum per chunk; the GPU pass decides the order.
        gpu_order=("cuda", "triton"),
        cpu_order=("cpu",),
        triton_module="fastvision.triton_kernels.masked_gather",
        benchmark_module="fastvision.benchmark.masked_gather",
    )
)


def masked_gather(x: torch.Tensor, mask: torch.Tensor, max_count: int | None = None) -> MaskedGather:
    """The features of each sample's masked sites, in row-major order, packed into ``M`` slots.

    Args:
        x: ``[B, C, H, W]`` float32, float16 or bfloat16, any strides (channels-last included).
        mask: ``[B, H, W]`` bool, True where a site is gathered; on ``x``'s device.
        max_count: the slot count ``M``; a sample with more sites keeps its first ``max_count``.
            ``None``: the largest count in the batch (one device-to-host synchronization).

    Returns:
        ``MaskedGather(values [B, M, C], indices [B, M, 2] int64 (h, w), valid [B, M] bool,
        counts [B] int64)``; slots past a sample's count hold 0, -1 and False.
    """
    return MASKED_GATHER(x, mask, max_count)
