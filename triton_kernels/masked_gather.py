"""Masked gather in Triton: a per-sample scan that assigns slots, then a gather of the channels.

1. ``masked_gather_scan_kernel``, one program per sample: walks the ``H * W`` mask in chunks of
   ``BLOCK`` sites, numbers the True sites with a running prefix sum (``tl.cumsum`` inside the
   chunk plus the count so far), writes the flat site of each slot below ``M``, then marks the
   slots past ``min(count, M)`` with -1 and writes ``count``. Reads the mask once; no atomics, no
   host synchronization (``M`` is an argument).
2. ``masked_gather_values_kernel``: programs over (slot blocks of all samples, channel blocks)
   read ``x[b, c, h, w]`` through its strides (any layout, channels-last included) and write
   ``values[b, m, c]``, zeros for empty slots.
3. backward: ``slot_of_site [B, H W + 1]`` int32 (-1 where no slot holds the site; the last column
   takes the empty slots) from the slot table by one ``scatter_``, then ``masked_gather_grad_kernel``
   writes every element of ``grad_x [B, C, H, W]`` once, along sites, from its slot's gradient or 0:
   no zero-fill of the whole gradient followed by scattered narrow stores.

Bytes moved, forward: the mask once (``B H W``), the gathered elements once (``B M C e``), the
outputs once (``B M (C e + 8 + 1)``) and the slot table twice (``16 B M``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Nothing spills at any configuration the launchers choose (checked for sm_90 by launch_configs()).
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {}


@triton.jit
def masked_gather_scan_kernel(
    mask_ptr, sites_ptr, valid_ptr, counts_ptr,
    num_sites, mask_stride_b, max_count,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask_row = mask_ptr + b * mask_stride_b
    sites_row = sites_ptr + b * max_count
    valid_row = valid_ptr + b * max_count
    count = 0
    for start in range(0, num_sites, BLOCK):
        site = start + offsets
        active = tl.load(mask_row + site, mask=site < num_sites, other=0).to(tl.int32)
        slot = count + tl.cumsum(active, 0) - 1
        keep = (active != 0) & (slot < max_count)
        tl.store(sites_row + slot, site.to(tl.int64), mask=keep)
        tl.store(valid_row + slot, 1, mask=keep)
        count += tl.sum(active, 0)
    filled = tl.minimum(count, max_count)
    for start in range(0, max_count, BLOCK):
        slot = start + offsets
        empty = (slot >= filled) & (slot < max_count)
        tl.store(sites_row + slot, -1, mask=empty)
        tl.store(valid_row + slot, 0, mask=empty)
    tl.store(counts_ptr + b, count.to(tl.int64))


@triton.jit
def masked_gather_values_kernel(
    x_ptr, sites_ptr, values_ptr,
    total_slots, max_count, channels, width,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SLOT_LANES: tl.constexpr,
):  # fmt: skip
    """``values[b, m, c]`` for ``BLOCK_S`` slots by ``BLOCK_C`` channels. ``SLOT_LANES`` (x not
    channels-last): the tile is ``[BLOCK_C, BLOCK_S]``, so the load runs along slots (the default order
    puts the last axis across lanes), reading nearby sites of one channel plane, and the store, along
    channels, gets its own layout (the transpose goes through shared memory); else ``[BLOCK_S,
    BLOCK_C]``, lanes along channels, contiguous in a channels-last x."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot_ok = slots < total_slots
    col_ok = cols < channels
    site = tl.load(sites_ptr + slots, mask=slot_ok, other=-1)
    present = site >= 0
    h, w = site // width, site % width
    b = slots // max_count
    at_site = b * x_stride_b + h * x_stride_h + w * x_stride_w
    channel_offset = cols.to(tl.int64) * x_stride_c
    if SLOT_LANES:
        source = x_ptr + at_site[None, :] + channel_offset[:, None]
        values = tl.load(source, mask=(present[None, :] & col_ok[:, None]), other=0.0)
        out = values_ptr + slots[None, :] * channels + cols[:, None]
        tl.store(out, values, mask=slot_ok[None, :] & col_ok[:, None])
    else:
        source = x_ptr + at_site[:, None] + channel_offset[None, :]
        values = tl.load(source, mask=(present[:, None] & col_ok[None, :]), other=0.0)
        out = values_ptr + slots[:, None] * channels + cols[None, :]
        tl.store(out, values, mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def masked_gather_grad_kernel(
    grad_values_ptr, slot_of_site_ptr, grad_x_ptr,
    num_sites, max_count, channels,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``grad_x[b, c, site]`` for ``BLOCK_S`` consecutive sites of one sample by ``BLOCK_C`` channels:
    the gradient of the site's slot, 0 where no slot holds the site. Every element is written once:
    the store runs along sites (contiguous in ``[B, C, H, W]``), the load of ``grad_values`` along
    channels (contiguous in ``[B, M, C]``)."""
    site_tiles = tl.cdiv(num_sites, BLOCK_S)
    b = (tl.program_id(0) // site_tiles).to(tl.int64)
    sites = (tl.program_id(0) % site_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    site_ok = sites < num_sites
    col_ok = cols < channels
    slot = tl.load(slot_of_site_ptr + b * (num_sites + 1) + sites, mask=site_ok, other=-1)
    present = (slot >= 0)[:, None] & col_ok[None, :]
    source = grad_values_ptr + ((b * max_count + slot) * channels)[:, None] + cols[None, :]
    grad = tl.load(source, mask=present, other=0.0)
    target = grad_x_ptr + b * channels * num_sites + cols[None, :].to(tl.int64) * num_sites + sites[:, None]
    tl.store(target, grad, mask=site_ok[:, None] & col_ok[None, :])


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_s: int
    block_c: int
    num_warps: int


SCAN_BLOCK = 1024
_MAX_BLOCK_C = 64


def scan_block(interpret: bool = False) -> int:
    # The interpreter runs each program in numpy: larger chunks amortize its per-iteration cost.
    return 16384 if interpret else SCAN_BLOCK


def gather_tile(channels: int, interpret: bool = False) -> Tile:
    """Slots x channels per program: about 2048 elements on a GPU (16 per thread at 4 warps); larger
    tiles spill the per-slot int64 addresses of narrow channel blocks."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    budget = 65536 if interpret else 2048
    block_s = max(16, budget // block_c)
    return Tile(block_s, block_c, 4)


def slot_lanes(x: torch.Tensor) -> bool:
    """Whether the gather's lanes run along slots: x's channels are not its innermost axis (NCHW-like),
    so neighbouring channels are a plane apart and neighbouring slots' sites are close."""
    return x.shape[1] > 1 and x.stride(1) != 1


def scan_grid(batch: int) -> tuple[int]:
    return (batch,)


def gather_grid(batch: int, max_count: int, channels: int, interpret: bool = False) -> tuple[int, int]:
    """Slot blocks of all samples on axis 0 (up to 2**31 - 1), channel blocks on axis 1
    (``ceil(C / 64)``: at most 65,535 for C up to 4,194,240)."""
    tile = gather_tile(channels, interpret)
    return (triton.cdiv(batch * max_count, tile.block_s), triton.cdiv(channels, tile.block_c))


def grad_grid(batch: int, num_sites: int, channels: int, interpret: bool = False) -> tuple[int, int]:
    """Site blocks of all samples on axis 0, channel blocks on axis 1 (as ``gather_grid``)."""
    tile = gather_tile(channels, interpret)
    return (batch * triton.cdiv(num_sites, tile.block_s), triton.cdiv(channels, tile.block_c))


# --- launchers ---------------------------------------------------------------------------------------


def masked_gather_forward(
    x: torch.Tensor, mask: torch.Tensor, max_count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [B, M, C], sites [B, M] int64, valid [B, M] bool, counts [B] int64)``."""
    batch, channels, height, width = x.shape
    interpret = interpreting()
    values = torch.empty((batch, max_count, channels), dtype=x.dtype, device=x.device)
    sites = torch.empty((batch, max_count), dtype=torch.int64, device=x.device)
    valid = torch.empty((batch, max_count), dtype=torch.bool, device=x.device)
    counts = torch.empty((batch,), dtype=torch.int64, device=x.device)
    if batch == 0:
        return values, sites, valid, counts
    flat_mask = mask.reshape(batch, height * width)
    if flat_mask.stride(1) != 1:
        flat_mask = flat_mask.contiguous()
    masked_gather_scan_kernel[scan_grid(batch)](
        flat_mask, sites, valid, counts, height * width, flat_mask.stride(0), max_count,
        BLOCK=scan_block(interpret), num_warps=4,
    )  # fmt: skip
    if max_count == 0 or channels == 0:
        return values, sites, valid, counts
    tile = gather_tile(channels, interpret)
    masked_gather_values_kernel[gather_grid(batch, max_count, channels, interpret)](
        x, sites, values, batch * max_count, max_count, channels, width, *x.stride(),
        BLOCK_S=tile.block_s, BLOCK_C=tile.block_c, SLOT_LANES=slot_lanes(x), num_warps=tile.num_warps,
    )  # fmt: skip
    return values, sites, valid, counts


def masked_gather_backward(
    grad_values: torch.Tensor, sites: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The gradient of ``x``: contiguous ``[B, C, H, W]``, zero except at gathered sites. A site outside
    ``[0, H * W)`` (-1: an empty slot) is no site's slot."""
    batch, max_count, channels = grad_values.shape
    num_sites = height * width
    if batch * channels * num_sites == 0 or max_count == 0:
        return grad_values.new_zeros((batch, channels, height, width))
    if max_count > 2**31 - 1:
        raise ValueError(f"masked_gather takes at most 2**31 - 1 slots per sample, got {max_count}")
    grad_x = grad_values.new_empty((batch, channels, height, width))
    in_range = (sites >= 0) & (sites < num_sites)
    slot_of_site = torch.full((batch, num_sites + 1), -1, dtype=torch.int32, device=sites.device)
    slot_ids = torch.arange(max_count, dtype=torch.int32, device=sites.device).expand(batch, max_count)
    slot_of_site.scatter_(1, torch.where(in_range, sites, num_sites), slot_ids)
    interpret = interpreting()
    tile = gather_tile(channels, interpret)
    masked_gather_grad_kernel[grad_grid(batch, num_sites, channels, interpret)](
        grad_values.contiguous(), slot_of_site, grad_x, num_sites, max_count, channels,
        BLOCK_S=tile.block_s, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
    )  # fmt: skip
    return grad_x


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_DTYPES = ("fp32", "fp16", "bf16")


def _benchmark_gradient_launch(constexprs: dict) -> dict[str, int]:
    """The gradient kernel's argument values at the benchmark's size (batch 256, 64 channels, 64 x 64
    sites, M = 2458 slots: a 60 % mask) on contiguous tensors, as Triton specializes that launch:
    pointers 16-byte aligned, ``num_sites`` and ``channels`` multiples of 16 (its stores along sites can
    then be 16-byte vectors), ``max_count`` not."""
    values = dict.fromkeys(("grad_values_ptr", "slot_of_site_ptr", "grad_x_ptr"), 16)
    values.update(num_sites=64 * 64, max_count=2458, channels=64)
    return values


def _benchmark_values_launch(constexprs: dict) -> dict[str, int]:
    """The gather's argument values at the same size: x NCHW with ``SLOT_LANES``, else channels-last."""
    values = dict.fromkeys(("x_ptr", "sites_ptr", "values_ptr"), 16)
    values.update(total_slots=256 * 2458, max_count=2458, channels=64, width=64)
    if constexprs["SLOT_LANES"]:
        values.update(x_stride_b=64 * 4096, x_stride_c=4096, x_stride_h=64, x_stride_w=1)
    else:
        values.update(x_stride_b=64 * 4096, x_stride_c=1, x_stride_h=64 * 64, x_stride_w=64)
    return values


LAUNCH_SPECIALIZATION = {
    "masked_gather_grad_kernel": _benchmark_gradient_launch,
    "masked_gather_values_kernel": _benchmark_values_launch,
}


def launch_configs() -> Iterator[KernelLaunch]:
    """The scan kernel, and the gather and gradient kernels at the tile of every channel class
    (powers of two up to the widest channel block), for every dtype."""
    block = scan_block()
    yield KernelLaunch(
        masked_gather_scan_kernel,
        kernel_signature(
            masked_gather_scan_kernel, {"BLOCK": block},
            {"mask_ptr": "*i1", "sites_ptr": "*i64", "valid_ptr": "*i1", "counts_ptr": "*i64"},
        ),  # fmt: skip
        {"BLOCK": block}, 4, label=f"scan BLOCK={block}",
    )  # fmt: skip
    channels = 1
    while channels <= _MAX_BLOCK_C:
        tile = gather_tile(channels)
        constexprs = {"BLOCK_S": tile.block_s, "BLOCK_C": tile.block_c}
        for dtype in _DTYPES:
            pointers = {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "sites_ptr": "*i64",
                        "grad_values_ptr": f"*{dtype}", "slot_of_site_ptr": "*i32",
                        "grad_x_ptr": f"*{dtype}"}  # fmt: skip
            label = f"{dtype} C<={tile.block_c} slots/sites={tile.block_s}"
            variants = [(masked_gather_values_kernel, {"SLOT_LANES": lanes}, " slot lanes" if lanes else "")
                        for lanes in (True, False)]  # fmt: skip
            for kernel, extra, suffix in [*variants, (masked_gather_grad_kernel, {}, "")]:
                chosen = {**constexprs, **extra}
                signature = kernel_signature(kernel, chosen, pointers)
                yield KernelLaunch(kernel, signature, chosen, tile.num_warps, label=label + suffix,
                                   tags={"dtype": dtype, "channels": channels})  # fmt: skip
        channels *= 2
