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

import torch
import triton
import triton.language as tl

from fastvision._backend import triton_interpreting

BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 32
MAX_SPLITS = 64  # programs per weight tile in the weight-gradient kernel


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
    """``out[o] = sum_k feats[neighbors[o, k]] @ weight[k]`` for a tile of sites and output channels."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    chunk of sites (float32 atomics across chunks)."""
    k = tl.program_id(0)
    tiles_n = tl.cdiv(c_out, BLOCK_N)
    chans = (tl.program_id(1) // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (tl.program_id(1) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chan_ok = chans < c_in
    col_ok = cols < c_out
    start = tl.program_id(2) * rows_per_split
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


def _flags(dtype: torch.dtype) -> dict:
    # The interpreter gives wrong bf16 dot products: upcast there (and for float32 inputs, a no-op).
    return {"UPCAST": triton_interpreting() or dtype == torch.float32, "IEEE": dtype == torch.float32}


def gather_gemm(feats: torch.Tensor, neighbors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[N, Cin]``, ``[N, K*K]`` int32, ``[K*K, Cin, Cout]`` -> ``[N, Cout]`` (feats' dtype)."""
    feats, neighbors, weight = feats.contiguous(), neighbors.contiguous(), weight.contiguous()
    n_sites, c_in = feats.shape
    num_offsets, _, c_out = weight.shape
    out = feats.new_empty((n_sites, c_out))
    if n_sites == 0 or c_out == 0:
        return out
    grid = (triton.cdiv(n_sites, BLOCK_M), triton.cdiv(c_out, BLOCK_N))
    gather_gemm_kernel[grid](
        feats, neighbors, weight, out, n_sites, c_in, c_out,
        NUM_OFFSETS=num_offsets, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **_flags(feats.dtype),
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
    splits = min(MAX_SPLITS, triton.cdiv(n_sites, 4 * BLOCK_M))
    rows_per_split = triton.cdiv(triton.cdiv(n_sites, splits), BLOCK_M) * BLOCK_M
    splits = triton.cdiv(n_sites, rows_per_split)
    grid = (num_offsets, triton.cdiv(c_in, BLOCK_K) * triton.cdiv(c_out, BLOCK_N), splits)
    weight_grad_kernel[grid](
        feats, neighbors, grad_out, grad_weight, n_sites, c_in, c_out, rows_per_split,
        NUM_OFFSETS=num_offsets, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **_flags(feats.dtype),
    )  # fmt: skip
    return grad_weight
