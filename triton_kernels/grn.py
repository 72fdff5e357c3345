"""Global Response Normalization in Triton, forward and backward, bit-identical run to run.

``x`` is channels-last ``[B, H, W, C]`` with any strides; sites are ``(h, w)``.

One pass where a sample fits: ``grn_fused_kernel`` runs one program per sample. It sums ``x^2``
(backward: also ``g * x`` and ``g``) over the sample's unmasked sites into per-channel float32
registers for every channel at once, forms ``Nx = Gx / (mean_c Gx + eps)`` and the per-channel
coefficients in registers, then walks the sample again and writes ``gamma * x * Nx + beta + x``
(backward: ``dx = g * (gamma * Nx + 1) + coef * x * keep``). The second walk reads the sample the same
program has just read, from L2 (the launcher takes this path only while the samples of the resident
programs fit in L2 at once: ``one_pass``): DRAM sees x (and g) once and the output once, in one
launch. The backward writes each sample's ``Nx * S`` and ``sum g`` ([B, C]); ``dgamma`` and ``dbeta``
are their sums over samples.

Two passes otherwise (samples too large for L2, too few samples to fill the machine, or more than
``MAX_FUSED_C`` channels): ``grn_reduce_kernel`` over (site chunk, channel block, sample) programs
writes per-chunk partial sums with plain stores into ``[k, B, chunks, C]``; torch sums the chunks in a
fixed order (``sum`` over a dimension: no atomics) and forms the ``[B, C]`` coefficients;
``grn_apply_kernel`` writes the output. Forward: x read twice, out written once.

No float atomics anywhere: every sum is taken in an order fixed by the shapes and the tile, so the same
inputs give the same bits on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Local memory found by compiling launch_configs() for sm_90: only the one-pass backward with a mask at
# 4 to 8 channels in 16-bit dtypes (8 to 32-byte frames at 96 registers); nothing elsewhere.
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "grn_fused_kernel": SpillAllowance(32, "the masked 16-bit backward at 4 to 8 channels only"),
}


@triton.jit
def _site_offsets(sites, width, stride_h, stride_w, FLAT_SITES: tl.constexpr):
    """Offsets of sites ``h * W + w``; with ``FLAT_SITES`` (``stride_h == W * stride_w``, as in any
    contiguous tensor) one multiply, without the division by ``W``."""
    sites = sites.to(tl.int64)
    if FLAT_SITES:
        return sites * stride_w
    return (sites // width) * stride_h + (sites % width) * stride_w


@triton.jit
def _load_tile(ptr, b, stride_b, stride_h, stride_w, stride_c, sites, width, cols, present, FLAT_SITES):
    rows = ptr + b * stride_b + _site_offsets(sites, width, stride_h, stride_w, FLAT_SITES)
    return tl.load(rows[:, None] + cols[None, :] * stride_c, mask=present, other=0.0).to(tl.float32)


@triton.jit
def _keep(mask_ptr, b, num_sites, sites, site_ok, HAS_MASK: tl.constexpr):
    """Sites that count towards Gx: in range and, with a mask, not masked."""
    keep = site_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * num_sites + sites, mask=site_ok, other=1) == 0)
    return keep


@triton.jit
def _site_sums(
    x_ptr, grad_ptr, mask_ptr, b, first, last, num_sites, width, cols, col_ok,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c, g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT_SITES: tl.constexpr,
):  # fmt: skip
    """Per channel over sites ``[first, last)`` of sample ``b``: the sum of kept x^2, and in the
    backward the sums of g * x and of g (zeros otherwise)."""
    # Tile-shaped accumulators, reduced over the sites once after the loop: the loop itself has no
    # cross-lane reduction (no shuffles or barriers per step).
    sumsq = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    dot = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for start in range(first, last, BLOCK_S):
        sites = start + tl.arange(0, BLOCK_S)
        site_ok = sites < last
        keep = _keep(mask_ptr, b, num_sites, sites, site_ok, HAS_MASK)
        present = site_ok[:, None] & col_ok[None, :]
        x = _load_tile(
            x_ptr, b, x_stride_b, x_stride_h, x_stride_w, x_stride_c, sites, width, cols, present, FLAT_SITES
        )
        kept = tl.where(keep[:, None], x, 0.0)
        sumsq += kept * kept
        if BACKWARD:
            g = _load_tile(grad_ptr, b, g_stride_b, g_stride_h, g_stride_w, g_stride_c, sites, width, cols,
                           present, FLAT_SITES)  # fmt: skip
            dot += g * x
            gsum += g
    return tl.sum(sumsq, 0), tl.sum(dot, 0), tl.sum(gsum, 0)


@triton.jit
def grn_fused_kernel(
    x_ptr, grad_ptr, mask_ptr, gamma_ptr, beta_ptr, out_ptr, stats_ptr,
    num_sites, channels, width, eps,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c,
    g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT_SITES: tl.constexpr,
):  # fmt: skip
    """One sample per program (axis 0), every channel in one block: statistics, then the apply walk."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    sumsq, dot, gsum = _site_sums(
        x_ptr, grad_ptr, mask_ptr, b, 0, num_sites, num_sites, width, cols, col_ok,
        x_stride_b, x_stride_h, x_stride_w, x_stride_c, g_stride_b, g_stride_h, g_stride_w, g_stride_c,
        HAS_MASK, BACKWARD, BLOCK_S, BLOCK_C, FLAT_SITES,
    )  # fmt: skip
    gx = tl.sqrt(sumsq)  # 0 on padded channels
    denom = tl.sum(gx, 0) / channels + eps
    nx = gx / denom
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = gamma * nx + 1.0
    if BACKWARD:
        dnx = gamma * dot
        dgx = dnx / denom - (tl.sum(dnx * gx, 0) / channels) / (denom * denom)
        coef = tl.where(gx > 0.0, dgx / tl.where(gx > 0.0, gx, 1.0), 0.0)
        stats = b * channels + cols
        tl.store(stats_ptr + stats, nx * dot, mask=col_ok)
        tl.store(stats_ptr + tl.num_programs(0).to(tl.int64) * channels + stats, gsum, mask=col_ok)
    else:
        shift = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, num_sites, BLOCK_S):
        sites = start + tl.arange(0, BLOCK_S)
        site_ok = sites < num_sites
        present = site_ok[:, None] & col_ok[None, :]
        x = _load_tile(
            x_ptr, b, x_stride_b, x_stride_h, x_stride_w, x_stride_c, sites, width, cols, present, FLAT_SITES
        )
        if BACKWARD:
            g = _load_tile(grad_ptr, b, g_stride_b, g_stride_h, g_stride_w, g_stride_c, sites, width, cols,
                           present, FLAT_SITES)  # fmt: skip
            keep_x = x
            if HAS_MASK:
                masked = tl.load(mask_ptr + b * num_sites + sites, mask=site_ok, other=1) != 0
                keep_x = tl.where(masked[:, None], 0.0, x)
            result = g * scale[None, :] + coef[None, :] * keep_x
        else:
            result = x * scale[None, :] + shift[None, :]
        out_rows = (b * num_sites + sites.to(tl.int64)) * channels
        tl.store(
            out_ptr + out_rows[:, None] + cols[None, :], result.to(out_ptr.dtype.element_ty), mask=present
        )


@triton.jit
def grn_reduce_kernel(
    x_ptr, grad_ptr, mask_ptr, sums_ptr,
    num_sites, channels, width, sites_per_program,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c,
    g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT_SITES: tl.constexpr,
):  # fmt: skip
    """Partial sums of one (site chunk, channel block, sample), stored at
    ``sums[k, b, chunk, c]`` (k: x^2, then g * x and g in the backward)."""
    b = tl.program_id(2).to(tl.int64)
    chunk = tl.program_id(0)
    chunks = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    first = chunk * sites_per_program
    last = tl.minimum(num_sites, first + sites_per_program)
    sumsq, dot, gsum = _site_sums(
        x_ptr, grad_ptr, mask_ptr, b, first, last, num_sites, width, cols, col_ok,
        x_stride_b, x_stride_h, x_stride_w, x_stride_c, g_stride_b, g_stride_h, g_stride_w, g_stride_c,
        HAS_MASK, BACKWARD, BLOCK_S, BLOCK_C, FLAT_SITES,
    )  # fmt: skip
    plane = tl.num_programs(2).to(tl.int64) * chunks * channels  # B C chunks can pass 2**31
    out = (b * chunks + chunk) * channels + cols
    tl.store(sums_ptr + out, sumsq, mask=col_ok)
    if BACKWARD:
        tl.store(sums_ptr + plane + out, dot, mask=col_ok)
        tl.store(sums_ptr + 2 * plane + out, gsum, mask=col_ok)


@triton.jit
def grn_apply_kernel(
    x_ptr, grad_ptr, mask_ptr, scale_ptr, coef_ptr, beta_ptr, out_ptr,
    num_sites, channels, width,
    x_stride_b, x_stride_h, x_stride_w, x_stride_c,
    g_stride_b, g_stride_h, g_stride_w, g_stride_c,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT_SITES: tl.constexpr,
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
    x = _load_tile(
        x_ptr, b, x_stride_b, x_stride_h, x_stride_w, x_stride_c, sites, width, cols, both, FLAT_SITES
    )
    if BACKWARD:
        g = _load_tile(
            grad_ptr, b, g_stride_b, g_stride_h, g_stride_w, g_stride_c, sites, width, cols, both, FLAT_SITES
        )
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


# --- tile and path choice (shared by the launchers and launch_configs) -----------------------------


@dataclass(frozen=True)
class Tile:
    block_s: int
    block_c: int
    num_warps: int


_MAX_BLOCK_C = 128
# Widest channel count the one-pass kernel holds (its accumulators are [C] vectors in registers).
MAX_FUSED_C = 2048
# L2 bytes the samples of the resident one-pass programs may take (x, and g in the backward): 80% of
# H100's 50 MB L2 (a GPU's own size is read from its properties), so that the second walk of a sample
# finds it there.
ONE_PASS_L2_BYTES = 40 * 1024 * 1024
_L2_SHARE = 0.8
# Resident one-pass programs per SM taken for the L2 estimate (registers allow 2 to 5 at the tiles
# launched): the estimate counts min(B, 4 x SMs) samples in L2 at once.
_RESIDENT_PER_SM = 4
_SMS = 132
# Fewer samples than this leave SMs idle in the one-pass kernel (one program per sample): two passes.
_MIN_FUSED_SAMPLES = 128


def grn_tile(channels: int, interpret: bool = False) -> Tile:
    """Sites x channels per program of the two-pass kernels: about 4096 elements on a GPU, channels
    contiguous."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    budget = 65536 if interpret else 4096
    block_s = max(8, budget // block_c)
    return Tile(block_s, block_c, 8 if block_s * block_c >= 4096 else 4)


def fused_tile(channels: int, backward: bool, num_sites: int | None = None, interpret: bool = False) -> Tile:
    """The one-pass kernel's tile: every channel (``next_power_of_2(C)``) by enough sites for about 4096
    elements on a GPU (2048 in the backward, which holds x and g); the interpreter takes a whole sample
    up to 65536 elements."""
    block_c = max(triton.next_power_of_2(max(channels, 1)), 1)
    if interpret:
        block_s = max(1, min(65536 // block_c, triton.next_power_of_2(max(num_sites or 1, 1))))
        return Tile(block_s, block_c, 4)
    budget = 2048 if backward else 4096
    block_s = max(1, budget // block_c)
    return Tile(block_s, block_c, 8 if block_s * block_c >= 4096 else 4)


def one_pass(batch: int, num_sites: int, channels: int, element_size: int, backward: bool,
             device: torch.device | None = None) -> bool:  # fmt: skip
    """Whether the one-pass kernel runs: channels up to ``MAX_FUSED_C``; the samples of the programs
    resident at once (``min(B, 4 x SMs)``, each ``H W C e`` bytes of x and, in the backward, as many of
    g) within 80% of L2 (``ONE_PASS_L2_BYTES`` without a GPU); on a GPU at least
    ``min(128, SMs)`` samples, so every SM has a program (ConvNeXt V2 at 256 x 14 x 14 x 384 bf16:
    38.5 MB, one pass; 256 x 56 x 56 x 96: 154 MB, two passes)."""
    if channels > MAX_FUSED_C:
        return False
    sms, l2_bytes = _SMS, ONE_PASS_L2_BYTES
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms = props.multi_processor_count
        l2_bytes = int(_L2_SHARE * getattr(props, "L2_cache_size", ONE_PASS_L2_BYTES / _L2_SHARE))
        if batch < min(_MIN_FUSED_SAMPLES, sms):
            return False
    sample_bytes = num_sites * channels * element_size * (2 if backward else 1)
    return min(batch, _RESIDENT_PER_SM * sms) * sample_bytes <= l2_bytes


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


def fused_grid(batch: int) -> tuple[int]:
    return (batch,)


_AXIS_LIMIT = 65535


def _check_grid(grid: tuple[int, int, int]) -> None:
    if grid[1] > _AXIS_LIMIT or grid[2] > _AXIS_LIMIT:
        raise ValueError(
            f"the triton grn kernels take at most {_AXIS_LIMIT} samples and {_AXIS_LIMIT * _MAX_BLOCK_C} "
            f"channels, got grid {grid}"
        )


# --- launchers ---------------------------------------------------------------------------------------


def _reduce(x, grad, mask, backward: bool) -> torch.Tensor:
    """``[k, B, C]`` float32 sums (k = 1 forward, 3 backward): per-chunk partials summed in chunk order."""
    batch, height, width, channels = x.shape
    num_sites = height * width
    interpret = interpreting()
    tile = grn_tile(channels, interpret)
    grid = reduce_grid(batch, num_sites, channels, interpret)
    _check_grid(grid)
    per_program = _sites_per_program(num_sites, batch, grid[1], tile, interpret)
    partial = torch.empty(
        (3 if backward else 1, batch, grid[0], channels), dtype=torch.float32, device=x.device
    )
    g = grad if backward else x
    grn_reduce_kernel[grid](
        x, g, mask, partial, num_sites, channels, width, per_program, *x.stride(), *g.stride(),
        HAS_MASK=mask.numel() > 0, BACKWARD=backward, BLOCK_S=tile.block_s, BLOCK_C=tile.block_c,
        FLAT_SITES=_flat_sites(x, g),
        num_warps=tile.num_warps,
    )  # fmt: skip
    return partial.sum(dim=2)


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
        FLAT_SITES=_flat_sites(x, g),
        num_warps=tile.num_warps,
    )  # fmt: skip


def _fused(x, grad, mask, gamma, beta, out, stats, eps, backward: bool):
    batch, height, width, channels = x.shape
    num_sites = height * width
    tile = fused_tile(channels, backward, num_sites, interpreting())
    g = grad if backward else x
    gamma, beta = gamma.contiguous(), beta.contiguous()
    grn_fused_kernel[fused_grid(batch)](
        x, g, mask, gamma, beta, out, stats, num_sites, channels, width, eps, *x.stride(), *g.stride(),
        HAS_MASK=mask.numel() > 0, BACKWARD=backward, BLOCK_S=tile.block_s, BLOCK_C=tile.block_c,
        FLAT_SITES=_flat_sites(x, g),
        num_warps=tile.num_warps,
    )  # fmt: skip


def _flat_sites(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's sites are evenly strided (``stride_h == W * stride_w``)."""
    return all(t.shape[1] <= 1 or t.stride(1) == t.shape[2] * t.stride(2) for t in tensors)


def _flat_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).contiguous() if mask.numel() else mask


def _choose(x: torch.Tensor, backward: bool, fused: bool | None) -> bool:
    if fused is not None:
        return fused and x.shape[3] <= MAX_FUSED_C
    batch, height, width, channels = x.shape
    return one_pass(batch, height * width, channels, x.element_size(), backward, x.device)


def grn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor, eps: float,
                fused: bool | None = None) -> torch.Tensor:  # fmt: skip
    """``gamma * x * Nx + beta + x``, a new contiguous channels-last tensor of ``x``'s dtype. ``fused``
    forces the one-pass (True) or two-pass (False) path; by default ``one_pass`` chooses."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    mask = _flat_mask(mask)
    if _choose(x, False, fused):
        no_stats = torch.empty((0,), dtype=torch.float32, device=x.device)  # written by the backward only
        _fused(x, x, mask, gamma, beta, out, no_stats, eps, backward=False)
        return out
    gx = _reduce(x, x, mask, backward=False)[0].sqrt_()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    scale = (gamma.float() * nx + 1).contiguous()
    _apply(x, x, mask, scale, scale, beta.float().contiguous(), out, backward=False)
    return out


def grn_backward(grad_out, x, gamma, beta, mask, eps, fused: bool | None = None):
    """``(dx, dgamma, dbeta)``; the parameter gradients are float32."""
    batch, channels = x.shape[0], x.shape[3]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    mask = _flat_mask(mask)
    if _choose(x, True, fused):
        stats = torch.empty((2, batch, channels), dtype=torch.float32, device=x.device)
        _fused(x, grad_out, mask, gamma, beta, dx, stats, eps, backward=True)
        return dx, stats[0].sum(0), stats[1].sum(0)
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
    """Every kernel, forward and backward, with and without a mask, evenly strided sites or not, for
    every dtype: the two-pass kernels at the tile of every channel class (powers of two up to the
    widest channel block), the one-pass kernel at every channel class up to ``MAX_FUSED_C``."""
    for dtype in _DTYPES:
        pointers = {
            "x_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "mask_ptr": "*i1",
            "sums_ptr": "*fp32", "stats_ptr": "*fp32", "scale_ptr": "*fp32", "coef_ptr": "*fp32",
            "beta_ptr": f"*{dtype}", "gamma_ptr": f"*{dtype}",
        }  # fmt: skip
        channels = 1
        while channels <= MAX_FUSED_C:
            two_pass = (grn_reduce_kernel, grn_apply_kernel) if channels <= _MAX_BLOCK_C else ()
            tiles = [
                (kernel, backward, grn_tile(channels)) for kernel in two_pass for backward in (False, True)
            ]
            tiles += [
                (grn_fused_kernel, backward, fused_tile(channels, backward)) for backward in (False, True)
            ]
            for kernel, backward, tile in tiles:
                kernel_pointers = dict(pointers)
                if kernel is grn_apply_kernel:
                    kernel_pointers["beta_ptr"] = "*fp32"  # the two-pass apply reads float32 [C] values
                for has_mask, flat in ((False, True), (True, True), (False, False), (True, False)):
                    constexprs = {"HAS_MASK": has_mask, "BACKWARD": backward, "BLOCK_S": tile.block_s,
                                  "BLOCK_C": tile.block_c, "FLAT_SITES": flat}  # fmt: skip
                    label = (f"{'backward' if backward else 'forward'} {dtype} C<={tile.block_c}"
                             f"{' masked' if has_mask else ''}"
                             f"{'' if flat else ' strided sites'}")  # fmt: skip
                    signature = kernel_signature(kernel, constexprs, kernel_pointers, {"eps": "fp32"})
                    tags = {"dtype": dtype, "channels": channels}
                    yield KernelLaunch(kernel, signature, constexprs, tile.num_warps, label=label, tags=tags)
            channels *= 2


def _contiguous_launch(constexprs: dict) -> dict[str, int]:
    """Argument values of a launch on a contiguous channels-last ``[B, H, W, C]`` tensor from torch's
    allocator, on which Triton specializes (bench/kernel_budget.py compiles what such a launch
    compiles): pointers 16-byte aligned, unit channel strides, ``C`` the widest of the tile's channel
    class (a multiple of 16 from 16 up, as ConvNeXt's 96 to 768 are) and the other strides multiples
    of it (for the classes of 2 to 8 channels, a site stride of 16: a slice of a 16-channel tensor).
    Sizes other than ``C`` (``num_sites``, ``width``) are left general."""
    channels, width, height = constexprs["BLOCK_C"], 64, 64  # any H, W: only divisibility matters
    site = channels if channels == 1 or channels % 16 == 0 else 16
    strides = {"b": height * width * site, "h": width * site, "w": site, "c": 1}
    values = {name: 16 for name in ("x_ptr", "grad_ptr", "mask_ptr", "gamma_ptr", "beta_ptr", "out_ptr",
                                    "stats_ptr", "sums_ptr", "scale_ptr", "coef_ptr")}  # fmt: skip
    values.update({f"{t}_stride_{axis}": stride for t in "xg" for axis, stride in strides.items()})
    values["channels"] = channels
    return values


LAUNCH_SPECIALIZATION = {
    kernel.fn.__name__: _contiguous_launch
    for kernel in (grn_fused_kernel, grn_reduce_kernel, grn_apply_kernel)
}
