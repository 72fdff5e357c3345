"""Submanifold sparse conv in Triton: fused gather-GEMM over a neighbour table, no scatter.

``neighbors[o, k]`` is the input row at kernel offset ``k`` of output site ``o`` (``-1``: none).

* forward: each program owns a ``BLOCK_M x BLOCK_N`` tile of outputs and, for every offset, gathers
  the neighbour rows of ``feats`` and multiplies them with ``weight[k]``; the sum over offsets stays
  in registers and is written once (output-stationary: no atomics, deterministic).
* grad of feats: a submanifold map is symmetric (input ``i`` is output ``o``'s neighbour at offset
  ``k`` exactly when ``o`` is ``i``'s neighbour at the mirrored offset ``K*K - 1 - k``), so it is
  the forward kernel on ``grad_out`` with the weight mirrored and transposed.
* grad of weight: ``grad_weight[k] = sum_o feats[neighbors[o, k]]^T grad_out[o]``: programs split
  the sites into chunks and add their partial products atomically into a float32 buffer.

Math in float32 (half-precision inputs are upcast before ``tl.dot`` when interpreting; float32
uses IEEE products, not TF32, so results match the reference to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 32
MAX_SPLITS = 64  # programs per weight tile in the weight-gradient kernel
NUM_WARPS = 4
# Programs on grid axis 0 (CUDA's limit); axis 1 of the weight-gradient grid holds at most MAX_SPLITS.
MAX_PROGRAMS = 2**31 - 1
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# sm_90: nothing spills at any configuration these launchers choose (checked by compiling
# launch_configs()).
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {}


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")
    return acc + tl.dot(a, b)


@triton.jit
def gather_gemm_kernel(
    feats_ptr,
    neighbors_ptr,
    weight_ptr,
    out_ptr,
    n_sites,
    c_in,
    c_out,
    NUM_OFFSETS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[o] = sum_k feats[neighbors[o, k]] @ weight[k]`` for a tile of sites and output channels.

    One-axis grid: program ``p`` takes site block ``p // tiles_n`` and channel block ``p % tiles_n``
    (the channel blocks of one site block are adjacent, so its gathered rows are reused from L2)."""
    tiles_n = tl.cdiv(c_out, BLOCK_N)
    rows = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_sites
    col_ok = cols < c_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(NUM_OFFSETS):
        neighbor = tl.load(neighbors_ptr + rows.to(tl.int64) * NUM_OFFSETS + k, mask=row_ok, other=-1)
        valid = neighbor >= 0
        source = neighbor.to(tl.int64) * c_in
        for c0 in range(0, c_in, BLOCK_K):
            chans = c0 + tl.arange(0, BLOCK_K)
            chan_ok = chans < c_in
            a = tl.load(
                feats_ptr + source[:, None] + chans[None, :],
                mask=valid[:, None] & chan_ok[None, :],
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
            acc = _dot(a, w, acc, IEEE)
    out = out_ptr + rows.to(tl.int64)[:, None] * c_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def weight_grad_kernel(
    feats_ptr,
    neighbors_ptr,
    grad_out_ptr,
    grad_weight_ptr,
    n_sites,
    c_in,
    c_out,
    rows_per_split,
    NUM_OFFSETS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``grad_weight[k, cin tile, cout tile] += feats[neighbors[rows, k]]^T @ grad_out[rows]`` over one
    chunk of sites (float32 atomics across chunks). Grid: (offsets x weight tiles, site chunks)."""
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
        valid = neighbor >= 0
        a = tl.load(
            feats_ptr + neighbor.to(tl.int64)[:, None] * c_in + chans[None, :],
            mask=valid[:, None] & chan_ok[None, :],
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
        acc = _dot(tl.trans(a), g, acc, IEEE)
    target = grad_weight_ptr + (k * c_in + chans[:, None]).to(tl.int64) * c_out + cols[None, :]
    tl.atomic_add(target, acc, mask=chan_ok[:, None] & col_ok[None, :])


def _flags(dtype: torch.dtype, interpret: bool) -> dict:
    # The interpreter gives wrong bf16 dot products: upcast there (and for float32 inputs, a no-op).
    return {"UPCAST": interpret or dtype == torch.float32, "IEEE": dtype == torch.float32}


def _check_programs(programs: int, what: str) -> None:
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"sparse_conv2d: {what} needs {programs} programs, over the grid limit {MAX_PROGRAMS}"
        )


def gather_gemm_grid(n_sites: int, c_out: int) -> tuple[int]:
    """Grid of the gather-GEMM kernel (forward and input gradient): site blocks x channel blocks on axis 0."""
    programs = triton.cdiv(n_sites, BLOCK_M) * triton.cdiv(c_out, BLOCK_N)
    _check_programs(programs, "the gather-GEMM")
    return (programs,)


def weight_grad_split(n_sites: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight-gradient kernel: site chunks summed with atomics."""
    splits = min(MAX_SPLITS, triton.cdiv(n_sites, 4 * BLOCK_M))
    rows_per_split = triton.cdiv(triton.cdiv(n_sites, splits), BLOCK_M) * BLOCK_M
    return triton.cdiv(n_sites, rows_per_split), rows_per_split


def weight_grad_grid(n_sites: int, c_in: int, c_out: int, num_offsets: int) -> tuple[int, int]:
    """Grid of the weight-gradient kernel: (offsets x weight tiles on axis 0, at most MAX_SPLITS site
    chunks on axis 1)."""
    programs = num_offsets * triton.cdiv(c_in, BLOCK_K) * triton.cdiv(c_out, BLOCK_N)
    _check_programs(programs, "the weight gradient")
    return (programs, weight_grad_split(n_sites)[0])


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and interpreting()


def gather_gemm(feats: torch.Tensor, neighbors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[N, Cin]``, ``[N, K*K]`` int32, ``[K*K, Cin, Cout]`` -> ``[N, Cout]`` (feats' dtype)."""
    feats, neighbors, weight = feats.contiguous(), neighbors.contiguous(), weight.contiguous()
    n_sites, c_in = feats.shape
    num_offsets, _, c_out = weight.shape
    out = feats.new_empty((n_sites, c_out))
    if n_sites == 0 or c_out == 0:
        return out
    gather_gemm_kernel[gather_gemm_grid(n_sites, c_out)](
        feats, neighbors, weight, out, n_sites, c_in, c_out,
        NUM_OFFSETS=num_offsets, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        **_flags(feats.dtype, _interpret(feats)), num_warps=NUM_WARPS,
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
    grad_weight = torch.zeros((num_offsets, c_in, c_out), dtype=torch.float32, device=feats.device)
    if n_sites == 0:
        return grad_weight
    if c_in == 0 or c_out == 0:
        return grad_weight
    _splits, rows_per_split = weight_grad_split(n_sites)
    weight_grad_kernel[weight_grad_grid(n_sites, c_in, c_out, num_offsets)](
        feats, neighbors, grad_out, grad_weight, n_sites, c_in, c_out, rows_per_split,
        NUM_OFFSETS=num_offsets, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        **_flags(feats.dtype, _interpret(feats)), num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad_weight


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

# Kernel sizes enumerated: each odd kernel size is its own NUM_OFFSETS = K*K variant (the offset loop
# is not unrolled, so registers and shared memory do not depend on it).
KERNEL_SIZES = (1, 3, 5, 7)


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps) the launchers can choose on a GPU: every dtype and
    the kernel sizes of KERNEL_SIZES, with the fixed tile BLOCK_M x BLOCK_N x BLOCK_K."""
    for dtype, name in _DTYPES.items():
        data = f"*{name}"
        pointers = {"feats_ptr": data, "neighbors_ptr": "*i32", "weight_ptr": data, "out_ptr": data,
                    "grad_out_ptr": data, "grad_weight_ptr": "*fp32"}  # fmt: skip
        for kernel_size in KERNEL_SIZES:
            constexprs = {"NUM_OFFSETS": kernel_size * kernel_size, **_flags(dtype, interpret=False),
                          "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}  # fmt: skip
            for kernel in (gather_gemm_kernel, weight_grad_kernel):
                yield KernelLaunch(
                    kernel,
                    kernel_signature(kernel, constexprs, pointers),
                    constexprs,
                    NUM_WARPS,
                    label=f"{kernel.fn.__name__} {name} K={kernel_size}",
                    tags={"dtype": name, "kernel_size": kernel_size},
                )
