"""Global Response Normalization in Triton: a reduction pass over the sites, then an apply pass.

``x`` is channels-last ``[B, H, W, C]`` with any strides; sites are ``(h, w)``.

Forward: ``grn_reduce_kernel`` sums ``x^2`` over the unmasked sites of each (sample, channel block)
into float32 ``[B, C]`` partials (programs over site chunks, so a sample's sites spread over the
machine; partials are added with float32 atomics into a zeroed buffer); the launcher forms
``Nx = Gx / (mean_c Gx + eps)`` in torch (``B x C`` values); ``grn_apply_kernel`` writes
``gamma * x * Nx + beta + x``.

Backward: the same reduction kernel also sums ``g * x`` and ``g`` (``S`` and the bias partials); the
launcher forms the per-(sample, channel) coefficients; ``grn_apply_backward_kernel`` writes
``dx = g * (gamma * Nx + 1) + coef * x * keep``.

Bytes moved: forward reads x twice and writes the output once; backward reads x and g twice and
writes dx once. The ``[B, C]`` statistics are negligible beside them.
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
def _site_offsets(sites, width, stride_h, stride_w):
    sites = sites.to(tl.int64)
    return (sites // width) * stride_h + (sites % width) * stride_w


@triton.jit
def grn_reduce_kernel(
    x_ptr, grad_ptr, mask_ptr, sumsq_ptr, dot_ptr, gsum_ptr,
    num_sites, channels, width, sites_per_program,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c,
    g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    first = tl.program_id(0) * sites_per_program
    sumsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(first, first + sites_per_program, BLOCK_S):
        sites = start + tl.arange(0, BLOCK_S)
        site_ok = sites < tl.minimum(num_sites, first + sites_per_program)
        keep = site_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * num_sites + sites, mask=site_ok, other=1) == 0)
        present = site_ok[:, None] & col_ok[None, :]
        x_rows = x_ptr + b * x_stride_b + _site_offsets(sites, width, x_stride_h, x_stride_w)
        x = tl.load(x_rows[:, None] + cols[None, :] * x_stride_c, mask=present, other=0.0).to(tl.float32)
        kept = tl.where(keep[:, None], x, 0.0)
        sumsq += tl.sum(kept * kept, 0)
        if BACKWARD:
            g_rows = grad_ptr + b * g_stride_b + _site_offsets(sites, width, g_stride_h, g_stride_w)
            g = tl.load(g_rows[:, None] + cols[None, :] * g_stride_c, mask=present, other=0.0).to(tl.float32)
            dot += tl.sum(g * x, 0)
            gsum += tl.sum(g, 0)
    out = b * channels + cols
    tl.atomic_add(sumsq_ptr + out, sumsq, mask=col_ok)
    if BACKWARD:
        tl.atomic_add(dot_ptr + out, dot, mask=col_ok)
        tl.atomic_add(gsum_ptr + out, gsum, mask=col_ok)


@triton.jit
def grn_apply_kernel(
    x_ptr, grad_ptr, mask_ptr, scale_ptr, coef_ptr, beta_ptr, out_ptr,
    num_sites, channels, width,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c,
    g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Forward: ``out = x * scale + beta`` with ``scale = gamma * Nx + 1``. Backward:
    ``dx = g * scale + coef * x * keep``. ``scale`` and ``coef`` are float32 ``[B, C]``."""
    b = tl.program_id(2).to(tl.int64)
    sites = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    site_ok = sites < num_sites
    col_ok = cols < channels
    both = site_ok[:, None] & col_ok[None, :]
    stats = b * channels + cols
    scale = tl.load(scale_ptr + stats, mask=col_ok, other=0.0)
    x_rows = x_ptr + b * x_stride_b + _site_offsets(sites, width, x_stride_h, x_stride_w)
    x = tl.load(x_rows[:, None] + cols[None, :] * x_stride_c, mask=both, other=0.0).to(tl.float32)
    if BACKWARD:
        g_rows = grad_ptr + b * g_stride_b + _site_offsets(sites, width, g_stride_h, g_stride_w)
        g = tl.load(g_rows[:, None] + cols[None, :] * g_stride_c, mask=both, other=0.0).to(tl.float32)
        coef = tl.load(coef_ptr + stats, mask=col_ok, other=0.0)
        keep_x = x
        if HAS_MASK:
            masked = tl.load(mask_ptr + b * num_sites + sites, mask=site_ok, other=1) != 0
            keep_x = tl.where(masked[:, None], 0.0, x)
        result = g * scale[None, :] + coef[None, :] * keep_x
    else:
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
        result = x * scale[None, :] + beta[None, :]
    out_rows = (b * num_sites + sites.to(tl.int64)) * channels
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], result.to(out_ptr.dtype.element_ty), mask=both)


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_s: int
    block_c: int
    num_warps: int


_MAX_BLOCK_C = 128


def grn_tile(channels: int, interpret: bool = False) -> Tile:
    """Sites x channels per program: about 4096 elements on a GPU, channels contiguous."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    budget = 65536 if interpret else 4096
    block_s = max(8, budget // block_c)
    return Tile(block_s, block_c, 8 if block_s * block_c >= 4096 else 4)


def _sites_per_program(num_sites: int, batch: int, channel_blocks: int, tile: Tile, interpret: bool) -> int:
    """Enough site programs per sample to give the machine a few thousand programs in all."""
    if interpret:
        return max(tile.block_s, triton.cdiv(num_sites, tile.block_s) * tile.block_s)
    wanted = max(1, 2048 // max(1, batch * channel_blocks))
    chunks = max(1, min(wanted, triton.cdiv(num_sites, tile.block_s)))
    return triton.cdiv(triton.cdiv(num_sites, chunks), tile.block_s) * tile.block_s


def reduce_grid(batch: int, num_sites: int, channels: int, interpret: bool = False) -> tuple[int, int, int]:
    """(site chunks, channel blocks, batch): batch on axis 2 and channel blocks on axis 1 hold at
    most 65,535 programs each, checked by the launcher."""
    tile = grn_tile(channels, interpret)
    channel_blocks = triton.cdiv(channels, tile.block_c)
    per_program = _sites_per_program(num_sites, batch, channel_blocks, tile, interpret)
    return (triton.cdiv(num_sites, per_program), channel_blocks, batch)


def apply_grid(batch: int, num_sites: int, channels: int, interpret: bool = False) -> tuple[int, int, int]:
    tile = grn_tile(channels, interpret)
    return (triton.cdiv(num_sites, tile.block_s), triton.cdiv(channels, tile.block_c), batch)


_AXIS_LIMIT = 65535


def _check_grid(grid: tuple[int, int, int]) -> None:
    if grid[1] > _AXIS_LIMIT or grid[2] > _AXIS_LIMIT:
        raise ValueError(
            f"the triton grn kernels take at most {_AXIS_LIMIT} samples and {_AXIS_LIMIT * _MAX_BLOCK_C} "
            f"channels, got grid {grid}"
        )


# --- launchers ---------------------------------------------------------------------------------------


def _reduce(x, grad, mask, backward: bool):
    batch, height, width, channels = x.shape
    num_sites = height * width
    interpret = interpreting()
    tile = grn_tile(channels, interpret)
    grid = reduce_grid(batch, num_sites, channels, interpret)
    _check_grid(grid)
    sums = torch.zeros((3 if backward else 1, batch, channels), dtype=torch.float32, device=x.device)
    per_program = _sites_per_program(num_sites, batch, grid[1], tile, interpret)
    g = grad if backward else x
    dot, gsum = (sums[1], sums[2]) if backward else (sums[0], sums[0])
    grn_reduce_kernel[grid](
        x, g, mask, sums[0], dot, gsum, num_sites, channels, width, per_program, *x.stride(), *g.stride(),
        HAS_MASK=mask.numel() > 0, BACKWARD=backward, BLOCK_S=tile.block_s, BLOCK_C=tile.block_c,
        num_warps=tile.num_warps,
    )  # fmt: skip
    return sums


def _apply(x, grad, mask, scale, coef, beta, out, backward: bool):
    batch, height, width, channels = x.shape
    interpret = interpreting()
    tile = grn_tile(channels, interpret)
    grid = apply_grid(batch, height * width, channels, interpret)
    _check_grid(grid)
    g = grad if backward else x
    grn_apply_kernel[grid](
        x, g, mask, scale, coef, beta, out, height * width, channels, width, *x.stride(), *g.stride(),
        HAS_MASK=mask.numel() > 0, BACKWARD=backward, BLOCK_S=tile.block_s, BLOCK_C=tile.block_c,
        num_warps=tile.num_warps,
    )  # fmt: skip


def _flat_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).contiguous() if mask.numel() else mask


def grn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor, eps: float):
    """``gamma * x * Nx + beta + x``, a new contiguous channels-last tensor of ``x``'s dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    mask = _flat_mask(mask)
    gx = _reduce(x, x, mask, backward=False)[0].sqrt_()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    scale = (gamma.float() * nx + 1).contiguous()
    _apply(x, x, mask, scale, scale, beta.float().contiguous(), out, backward=False)
    return out


def grn_backward(grad_out, x, gamma, beta, mask, eps):
    """``(dx, dgamma, dbeta)``; the parameter gradients are float32."""
    channels = x.shape[3]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    mask = _flat_mask(mask)
    sumsq, dot, gsum = _reduce(x, grad_out, mask, backward=True)
    gamma32 = gamma.float()
    gx = sumsq.sqrt()
    denom = gx.mean(dim=-1, keepdim=True) + eps
    nx = gx / denom
    dnx = gamma32 * dot
    dgx = dnx / denom - (dnx * gx).mean(dim=-1, keepdim=True) / denom**2
    coef = torch.where(gx > 0, dgx / gx, torch.zeros_like(gx)).contiguous()
    scale = (gamma32 * nx + 1).contiguous()
    _apply(x, grad_out, mask, scale, coef, scale, dx, backward=True)
    return dx, (nx * dot).sum(0), gsum.sum(0)


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_DTYPES = ("fp32", "fp16", "bf16")


def launch_configs() -> Iterator[KernelLaunch]:
    """Both kernels, forward and backward, with and without a mask, at the tile of every channel
    class (powers of two up to the widest channel block), for every dtype."""
    channels = 1
    while channels <= _MAX_BLOCK_C:
        tile = grn_tile(channels)
        for dtype in _DTYPES:
            pointers = {
                "x_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "mask_ptr": "*i1",
                "sumsq_ptr": "*fp32", "dot_ptr": "*fp32", "gsum_ptr": "*fp32",
                "scale_ptr": "*fp32", "coef_ptr": "*fp32", "beta_ptr": "*fp32",
            }  # fmt: skip
            for kernel in (grn_reduce_kernel, grn_apply_kernel):
                for backward in (False, True):
                    for has_mask in (False, True):
                        constexprs = {"HAS_MASK": has_mask, "BACKWARD": backward,
                                      "BLOCK_S": tile.block_s, "BLOCK_C": tile.block_c}  # fmt: skip
                        label = (f"{'backward' if backward else 'forward'} {dtype} C<={tile.block_c}"
                                 f"{' masked' if has_mask else ''}")  # fmt: skip
                        signature = kernel_signature(kernel, constexprs, pointers)
                        tags = {"dtype": dtype, "channels": channels}
                        yield KernelLaunch(
                            kernel, signature, constexprs, tile.num_warps, label=label, tags=tags
                        )
        channels *= 2
