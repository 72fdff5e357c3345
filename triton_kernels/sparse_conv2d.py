"""Submanifold sparse conv in Triton: an implicit GEMM over a neighbour table, no scatter.

``neighbors[o, k]`` is the input row at kernel offset ``k`` of output site ``o`` (``-1``: none).

* forward: each program owns a ``BLOCK_M x BLOCK_N`` tile of outputs. One flat K loop runs over
  (kernel offset, input-channel chunk): the A operand is ``BLOCK_M`` rows of ``feats`` gathered
  through the table, B the matching chunk of ``weight[k]``, both fed to ``tl.dot`` (wgmma for 16-bit
  inputs: ``BLOCK_M >= 64``). The loop holds no inner loop, so its loads pipeline (``num_stages``).
  Offsets at which no site of the tile has a neighbour are skipped: the launcher lists, per site
  tile, the offsets present there first (``tile_offsets``), and the loop runs only over those. The
  sum stays in registers and is written once (output-stationary: no atomics, deterministic).
* grad of feats: a submanifold map is symmetric (input ``i`` is output ``o``'s neighbour at offset
  ``k`` exactly when ``o`` is ``i``'s neighbour at the mirrored offset ``K*K - 1 - k``), so it is
  the forward kernel on ``grad_out`` with the weight mirrored and transposed (the transposed
  implicit GEMM over the same table; no atomics).
* grad of weight: ``grad_weight[k] = sum_o feats[neighbors[o, k]]^T grad_out[o]``, per-offset GEMMs
  over site chunks; each chunk writes its own float32 partial and the partials are summed in chunk
  order (no atomics: bit-identical run to run). The chunking depends only on the shapes.

Tiles come from a small table keyed on (Cin, Cout, dtype) (``conv_tile``, ``weight_grad_tile``),
every entry compiled by the sm_90 budget check; nothing is autotuned at run time. Math in float32:
float16/bfloat16 products accumulate in float32; float32 inputs use TF32 products when
``torch.get_float32_matmul_precision()`` is not ``"highest"`` (``torch.backends.cuda.matmul.
allow_tf32``), IEEE products otherwise (the default: results match the reference to float32
rounding). Half-precision inputs are upcast before ``tl.dot`` when interpreting.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Programs the weight gradient aims for (site chunks x offsets x weight tiles): a constant, not the
# device's SM count, so that the chunking (and the summation order) is the same on every GPU.
WEIGHT_GRAD_PROGRAMS = 512
MAX_SPLITS = 64  # site chunks per weight tile (axis 1 of the weight-gradient grid)
# Programs on grid axis 0 (CUDA's limit).
MAX_PROGRAMS = 2**31 - 1
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# sm_90: nothing spills at any configuration these launchers choose (checked by compiling
# launch_configs()).
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {}


@dataclass(frozen=True)
class ConvTile:
    """One kernel's tile: ``block_m`` rows (sites), ``block_n`` output columns, ``block_k`` the
    reduction chunk; warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _pow2_within(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def conv_tile(c_in: int, c_out: int, dtype: torch.dtype) -> ConvTile:
    """The implicit-GEMM tile (forward and input gradient) for ``c_in -> c_out`` channels.

    16-bit: 128-site tiles once Cout fills 64 columns (64 below), K chunks of up to 64 channels, three
    stages (at most 96 KiB of shared memory at 128 x 128 x 64); 8 warps for the 128 x 128
    accumulator. float32: 64 x 64 x 32 at most, two stages (the IEEE product runs on CUDA cores)."""
    if dtype in (torch.float16, torch.bfloat16):
        block_n = _pow2_within(c_out, 16, 128)
        block_m = 128 if block_n >= 64 else 64
        return ConvTile(block_m, block_n, _pow2_within(c_in, 16, 64), 8 if block_n == 128 else 4, 3)
    return ConvTile(64, _pow2_within(c_out, 16, 64), _pow2_within(c_in, 16, 32), 4, 2)


def weight_grad_tile(c_in: int, c_out: int, dtype: torch.dtype) -> ConvTile:
    """The weight-gradient tile: ``block_k`` input channels x ``block_n`` output channels per program,
    ``block_m`` sites per step of its reduction (the dot's M is ``block_k``: wgmma from 64)."""
    if dtype in (torch.float16, torch.bfloat16):
        return ConvTile(64, _pow2_within(c_out, 16, 128), _pow2_within(c_in, 16, 64), 4, 3)
    return ConvTile(32, _pow2_within(c_out, 16, 64), _pow2_within(c_in, 16, 32), 4, 2)


@triton.jit
def implicit_gemm_kernel(
    feats_ptr,
    neighbors_ptr,
    tile_offsets_ptr,
    tile_counts_ptr,
    weight_ptr,
    out_ptr,
    n_sites,
    c_in,
    c_out,
    NUM_OFFSETS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[o] = sum_k feats[neighbors[o, k]] @ weight[k]`` for a tile of sites and output channels.

    One-axis grid: program ``p`` takes site tile ``p // tiles_n`` and channel block ``p % tiles_n``
    (the channel blocks of one site tile are adjacent, so its gathered rows are reused from L2). The
    K loop runs over ``tile_counts[tile]`` offsets (``tile_offsets[tile, :count]``) x the input
    channel chunks."""
    tiles_n = tl.cdiv(c_out, BLOCK_N)
    tile = tl.program_id(0) // tiles_n
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_sites
    col_ok = cols < c_out
    row_table = neighbors_ptr + rows.to(tl.int64) * NUM_OFFSETS
    offsets = tile_offsets_ptr + tile.to(tl.int64) * NUM_OFFSETS
    chunks = tl.cdiv(c_in, BLOCK_K)
    steps = tl.load(tile_counts_ptr + tile) * chunks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        slot = step // chunks
        k = tl.load(offsets + slot)
        chans = (step - slot * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        chan_ok = chans < c_in
        neighbor = tl.load(row_table + k, mask=row_ok, other=-1)
        a = tl.load(
            feats_ptr + neighbor.to(tl.int64)[:, None] * c_in + chans[None, :],
            mask=(neighbor >= 0)[:, None] & chan_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + (k * c_in + chans[:, None]).to(tl.int64) * c_out + cols[None, :],
            mask=chan_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * c_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def weight_grad_kernel(
    feats_ptr,
    neighbors_ptr,
    grad_out_ptr,
    partial_ptr,
    n_sites,
    c_in,
    c_out,
    rows_per_split,
    NUM_OFFSETS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``partial[chunk, k, cin tile, cout tile] = feats[neighbors[rows, k]]^T @ grad_out[rows]`` over
    one chunk of sites. Grid: (offsets x weight tiles, site chunks); every element of ``partial`` is
    written by exactly one program."""
    tiles_n = tl.cdiv(c_out, BLOCK_N)
    tiles = tl.cdiv(c_in, BLOCK_K) * tiles_n
    k = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    chans = (tile // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chan_ok = chans < c_in
    col_ok = cols < c_out
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, n_sites)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        neighbor = tl.load(neighbors_ptr + rows.to(tl.int64) * NUM_OFFSETS + k, mask=row_ok, other=-1)
        a = tl.load(
            feats_ptr + neighbor.to(tl.int64)[:, None] * c_in + chans[None, :],
            mask=(neighbor >= 0)[:, None] & chan_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            grad_out_ptr + rows.to(tl.int64)[:, None] * c_out + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    chunk = tl.program_id(1).to(tl.int64) * NUM_OFFSETS + k
    target = partial_ptr + (chunk * c_in + chans[:, None]) * c_out + cols[None, :]
    tl.store(target, acc, mask=chan_ok[:, None] & col_ok[None, :])


def float32_precision() -> str:
    """The product precision of float32 inputs: TF32 when torch's float32 matmul precision allows it
    (``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.allow_tf32``),
    IEEE otherwise."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _flags(dtype: torch.dtype, interpret: bool) -> dict:
    # The interpreter gives wrong bf16 dot products: upcast there (and for float32 inputs, a no-op).
    precision = float32_precision() if dtype == torch.float32 else "tf32"  # unused for 16-bit inputs
    return {"UPCAST": interpret or dtype == torch.float32, "PRECISION": precision}


def _check_programs(programs: int, what: str) -> None:
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"sparse_conv2d: {what} needs {programs} programs, over the grid limit {MAX_PROGRAMS}"
        )


def implicit_gemm_grid(n_sites: int, c_out: int, tile: ConvTile) -> tuple[int]:
    """Grid of the implicit-GEMM kernel (forward and input gradient): site tiles x channel blocks on
    axis 0."""
    programs = triton.cdiv(n_sites, tile.block_m) * triton.cdiv(c_out, tile.block_n)
    _check_programs(programs, "the implicit GEMM")
    return (programs,)


def weight_grad_split(
    n_sites: int, c_in: int, c_out: int, num_offsets: int, tile: ConvTile
) -> tuple[int, int]:
    """(site chunks, rows per chunk) of the weight gradient: about WEIGHT_GRAD_PROGRAMS programs in
    all, at most MAX_SPLITS chunks, each at least two steps of ``block_m`` sites."""
    tiles = num_offsets * triton.cdiv(c_in, tile.block_k) * triton.cdiv(c_out, tile.block_n)
    wanted = min(MAX_SPLITS, triton.cdiv(WEIGHT_GRAD_PROGRAMS, tiles), triton.cdiv(n_sites, 2 * tile.block_m))
    rows_per_split = triton.cdiv(triton.cdiv(n_sites, max(wanted, 1)), tile.block_m) * tile.block_m
    return triton.cdiv(n_sites, rows_per_split), rows_per_split


def weight_grad_grid(
    n_sites: int, c_in: int, c_out: int, num_offsets: int, tile: ConvTile
) -> tuple[int, int]:
    """Grid of the weight-gradient kernel: (offsets x weight tiles on axis 0, at most MAX_SPLITS site
    chunks on axis 1)."""
    programs = num_offsets * triton.cdiv(c_in, tile.block_k) * triton.cdiv(c_out, tile.block_n)
    _check_programs(programs, "the weight gradient")
    return (programs, weight_grad_split(n_sites, c_in, c_out, num_offsets, tile)[0])


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and interpreting()


def tile_offsets(neighbors: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[tiles, K*K]`` int32, ``[tiles]`` int32): per tile of ``block_m`` sites, the offsets at which
    some site of the tile has a neighbour (in rising order, first), and how many there are."""
    n_sites, num_offsets = neighbors.shape
    tiles = triton.cdiv(n_sites, block_m)
    present = torch.zeros((tiles * block_m, num_offsets), dtype=torch.int8, device=neighbors.device)
    present[:n_sites] = neighbors >= 0
    present = present.view(tiles, block_m, num_offsets).amax(1)
    counts = present.sum(1, dtype=torch.int32)
    order = torch.sort(present, dim=1, descending=True, stable=True).indices.to(torch.int32)
    return order.contiguous(), counts


def gather_gemm(feats: torch.Tensor, neighbors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[N, Cin]``, ``[N, K*K]`` int32, ``[K*K, Cin, Cout]`` -> ``[N, Cout]`` (feats' dtype)."""
    feats, neighbors, weight = feats.contiguous(), neighbors.contiguous(), weight.contiguous()
    n_sites, c_in = feats.shape
    num_offsets, _, c_out = weight.shape
    out = feats.new_empty((n_sites, c_out))
    if n_sites == 0 or c_out == 0:
        return out
    if c_in == 0:
        return out.zero_()
    tile = conv_tile(c_in, c_out, feats.dtype)
    offsets, counts = tile_offsets(neighbors, tile.block_m)
    implicit_gemm_kernel[implicit_gemm_grid(n_sites, c_out, tile)](
        feats, neighbors, offsets, counts, weight, out, n_sites, c_in, c_out,
        NUM_OFFSETS=num_offsets, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        **_flags(feats.dtype, _interpret(feats)), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out


def mirrored_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight of the transposed (input-gradient) conv: offsets mirrored, channels swapped."""
    return weight.flip(0).transpose(1, 2).contiguous()


def weight_grad(
    feats: torch.Tensor, neighbors: torch.Tensor, grad_out: torch.Tensor, num_offsets: int
) -> torch.Tensor:
    """``[K*K, Cin, Cout]`` float32 weight gradient."""
    feats, neighbors, grad_out = feats.contiguous(), neighbors.contiguous(), grad_out.contiguous()
    n_sites, c_in = feats.shape
    c_out = grad_out.shape[1]
    if n_sites == 0 or c_in == 0 or c_out == 0:
        return torch.zeros((num_offsets, c_in, c_out), dtype=torch.float32, device=feats.device)
    tile = weight_grad_tile(c_in, c_out, feats.dtype)
    splits, rows_per_split = weight_grad_split(n_sites, c_in, c_out, num_offsets, tile)
    partial = torch.empty((splits, num_offsets, c_in, c_out), dtype=torch.float32, device=feats.device)
    weight_grad_kernel[weight_grad_grid(n_sites, c_in, c_out, num_offsets, tile)](
        feats, neighbors, grad_out, partial, n_sites, c_in, c_out, rows_per_split,
        NUM_OFFSETS=num_offsets, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        **_flags(feats.dtype, _interpret(feats)), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

# Kernel sizes enumerated: each odd kernel size is its own NUM_OFFSETS = K*K variant (only index
# arithmetic depends on it: registers and shared memory do not).
KERNEL_SIZES = (1, 3, 5, 7)
# Channel counts whose tiles cover every tile conv_tile and weight_grad_tile can choose.
TILE_CHANNELS = (16, 32, 64, 128)


def _benchmark_launch(constexprs: dict) -> dict[str, int]:
    """Argument values of a launch at the benchmark's sizes (64 or 128 channels) on contiguous tensors
    from torch's allocator, as Triton specializes it: pointers 16-byte aligned, channel counts and the
    weight gradient's rows per chunk multiples of 16 (each gathered row then gives 16 contiguous,
    aligned bytes per access); the site count stays general."""
    values = dict.fromkeys(("feats_ptr", "neighbors_ptr", "tile_offsets_ptr", "tile_counts_ptr",
                            "weight_ptr", "out_ptr", "grad_out_ptr", "partial_ptr"), 16)  # fmt: skip
    return {**values, "c_in": 64, "c_out": 64, "rows_per_split": 4 * constexprs["BLOCK_M"]}


LAUNCH_SPECIALIZATION = {"implicit_gemm_kernel": _benchmark_launch, "weight_grad_kernel": _benchmark_launch}


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps, stages) the launchers can choose on a GPU: every
    dtype (float32 with IEEE and TF32 products), every tile of ``conv_tile`` and ``weight_grad_tile``,
    and the kernel sizes of KERNEL_SIZES."""
    choosers = ((implicit_gemm_kernel, conv_tile), (weight_grad_kernel, weight_grad_tile))
    for dtype, name in _DTYPES.items():
        data = f"*{name}"
        pointers = {"feats_ptr": data, "neighbors_ptr": "*i32", "tile_offsets_ptr": "*i32",
                    "tile_counts_ptr": "*i32", "weight_ptr": data, "out_ptr": data, "grad_out_ptr": data,
                    "partial_ptr": "*fp32"}  # fmt: skip
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for kernel, chooser in choosers:
            tiles = sorted(
                {chooser(c_in, c_out, dtype) for c_in, c_out in itertools.product(TILE_CHANNELS, repeat=2)},
                key=lambda t: (t.block_m * t.block_n * t.block_k, t.block_n, t.block_k),
            )
            for tile, kernel_size, precision in itertools.product(tiles, KERNEL_SIZES, precisions):
                constexprs = {"NUM_OFFSETS": kernel_size * kernel_size, "UPCAST": dtype == torch.float32,
                              "PRECISION": precision, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                              "BLOCK_K": tile.block_k}  # fmt: skip
                shape = f"{tile.block_m}x{tile.block_n}x{tile.block_k}"
                label = f"{kernel.fn.__name__} {name} K={kernel_size} {shape}"
                label += f" {precision}" if dtype == torch.float32 else ""
                yield KernelLaunch(
                    kernel,
                    kernel_signature(kernel, constexprs, pointers),
                    constexprs,
                    tile.num_warps,
                    tile.num_stages,
                    label=label,
                    tags={"dtype": name, "kernel_size": kernel_size},
                )
