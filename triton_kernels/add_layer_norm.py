"""Fused residual add + LayerNorm forward and backward in Triton.

Inputs are viewed as rows ``[M, D]`` (unit stride along the last dim, any row stride). Rows of up to
``ROW_BLOCK_MAX`` columns are held whole in registers: ``BLOCK_N = next_power_of_2(D)`` columns and,
for small ``D``, ``BLOCK_M`` rows at once so each program still has enough work. Longer rows (up to
``MAX_DIM``) are processed in column chunks of ``ROW_BLOCK_MAX``, so no configuration needs more
registers than the whole-row ones. Statistics and math are float32; storage is in the input dtype;
weight and bias may be float32 or the input dtype.

Statistics are exact at the edges of float32:

* the mean is ``s0 + sum((s/2 - s0/2) * (2 / n))`` with ``s0`` the row's first element, so a row of
  identical values has exactly its value as mean and normalizes to exactly 0, and no partial sum or
  difference overflows for values up to the float32 maximum;
* the variance is two-pass (mean-subtracted, never ``E[s^2] - E[s]^2``) and scaled: squares are
  taken of ``(s/2 - mean/2) / max|s/2 - mean/2|``, so rows whose magnitude nears 1e19 or more, whose
  squares overflow float32, still give the finite ``rstd``, and ``out = (s/2 - mean/2) * (2 rstd)``
  (the same bits as ``(s - mean) * rstd`` wherever that does not overflow). Column chunks are
  combined with the pairwise (Chan et al.) update in the same scaled form.

The forward writes ``out``, the per-row ``mean`` and ``rstd`` (float32) and, with ``RETURN_SUM``,
``x + residual`` in the input dtype from the same loads (the pre-norm residual stream). The backward
recomputes ``x + residual`` from both inputs rather than reading a saved sum: the forward then moves
three rows instead of four, a training step moves the same seven, and no extra activation is stored;
a gradient of the returned sum (``GRAD_SUM``) is added into ``dx`` in the same pass.
Weight and bias are read in their own dtype (float32 or the input dtype) and widened in registers:
no per-call cast. The backward writes one ``dx`` (``d/dx == d/dresidual``) and per-program partial sums of
``dweight``/``dbias`` into ``[num_programs, D]`` float32 buffers that are summed afterwards, which
avoids atomics and keeps the reduction deterministic. For chunked rows a first kernel writes the two
row means the gradient needs (``mean(g)`` and ``mean(g * x_hat)``, ``g = dy * weight``) and the main
kernel then runs over (row programs, column chunks).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import (
    KernelLaunch,
    SpillAllowance,
    as_rows,
    interpreting,
    kernel_signature,
)

# Longest row the kernels take (the op layer reads this as its limit for the triton backend).
MAX_DIM = 65536
# Longest row held whole in registers; longer rows are processed in chunks of this many columns.
ROW_BLOCK_MAX = 4096
# Elements per program on a GPU (the interpreter uses larger tiles: see elements_per_program).
GPU_ELEMENTS = 4096
# The interpreter's rows-per-program target (its per-program cost dominates).
_INTERPRETER_ELEMENTS = 65536
# Narrowest column block: shorter rows share one tile class.
MIN_BLOCK_N = 16

# Local memory found by compiling every configuration of launch_configs() for sm_90: an 8-byte frame
# (2 to 4 LDL/STL in the whole kernel) in 9 backward tiles with parameter gradients, mostly at 16 warps
# and 64 registers; nothing in the forward.
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "add_layer_norm_backward_kernel": SpillAllowance(8, "an 8-byte frame, 2 to 4 accesses, in 9 tiles"),
}


@triton.jit
def _chunk_stats(summed, mask, shift, count):
    """Mean, half-scale and scaled sum of squares of each row of ``summed`` [M, N] over ``mask``.

    ``mean = shift + sum((s/2 - shift/2) * (2 / count))`` (no term or partial sum overflows, and a
    row of equal values gets exactly that value); ``scale = max|s/2 - mean/2|`` (1 when that is 0 or
    tiny, where nothing can overflow); ``q = sum(((s/2 - mean/2) / scale)^2)``, so that the row's sum
    of squared deviations is ``(2 scale)^2 * q`` without ever forming a square that overflows.
    """
    weight = 2.0 / count
    mean = shift + tl.sum(tl.where(mask, (summed * 0.5 - (shift * 0.5)[:, None]) * weight, 0.0), axis=1)
    centered = tl.where(mask, summed * 0.5 - (mean * 0.5)[:, None], 0.0)
    largest = tl.max(tl.abs(centered), axis=1)
    scale = tl.where(largest > 1e-30, largest, 1.0)
    scaled = centered / scale[:, None]
    return mean, scale, tl.sum(scaled * scaled, axis=1)


@triton.jit
def _split3_stats(s0, s1, s2, m0, m1, m2, shift, count):
    """``_chunk_stats`` of a row held as three column blocks (``[M, N]`` each, masks ``m0..m2``)."""
    weight = 2.0 / count
    half_shift = (shift * 0.5)[:, None]
    total = tl.sum(tl.where(m0, (s0 * 0.5 - half_shift) * weight, 0.0), axis=1)
    total += tl.sum(tl.where(m1, (s1 * 0.5 - half_shift) * weight, 0.0), axis=1)
    total += tl.sum(tl.where(m2, (s2 * 0.5 - half_shift) * weight, 0.0), axis=1)
    mean = shift + total
    half_mean = (mean * 0.5)[:, None]
    c0 = tl.where(m0, s0 * 0.5 - half_mean, 0.0)
    c1 = tl.where(m1, s1 * 0.5 - half_mean, 0.0)
    c2 = tl.where(m2, s2 * 0.5 - half_mean, 0.0)
    largest = tl.maximum(tl.maximum(tl.max(tl.abs(c0), axis=1), tl.max(tl.abs(c1), axis=1)),
                         tl.max(tl.abs(c2), axis=1))  # fmt: skip
    scale = tl.where(largest > 1e-30, largest, 1.0)
    c0 = c0 / scale[:, None]
    c1 = c1 / scale[:, None]
    c2 = c2 / scale[:, None]
    return mean, scale, tl.sum(c0 * c0, axis=1) + tl.sum(c1 * c1, axis=1) + tl.sum(c2 * c2, axis=1)


@triton.jit
def _merge_stats(n_a, mean_a, scale_a, q_a, n_b, mean_b, scale_b, q_b):
    """Pairwise update of (count, mean, half-scale, scaled sum of squares) for two disjoint parts of
    a row, in halves so that no difference overflows."""
    n = n_a + n_b
    delta = mean_b * 0.5 - mean_a * 0.5
    # mean_a + 2 delta n_b / n; its convex form where that product could overflow.
    mean = tl.where(
        tl.abs(delta) < 1e38, mean_a + delta * (2.0 * n_b / n), mean_a * (n_a / n) + mean_b * (n_b / n)
    )
    scale = tl.maximum(tl.maximum(scale_a, scale_b), tl.abs(delta))
    ra = scale_a / scale
    rb = scale_b / scale
    rd = delta / scale
    q = q_a * ra * ra + q_b * rb * rb + rd * rd * (n_a * (n_b / n))
    return n, mean, scale, q


@triton.jit
def _rstd(scale, q, dim, eps):
    """``1 / sqrt((2 scale)^2 * q / dim + eps)`` without overflow when ``scale`` is huge."""
    var_scaled = q / dim
    large = 0.5 / (scale * tl.sqrt(var_scaled + (eps / scale) / scale * 0.25))
    bounded = tl.minimum(scale, 1.0)  # the branch not taken must not overflow either
    small = 1.0 / tl.sqrt(var_scaled * (4.0 * bounded * bounded) + eps)
    return tl.where(scale > 1.0, large, small)


@triton.jit
def _load_sum(x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, cols, mask):
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    residual = tl.load(
        residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
    )
    return x.to(tl.float32) + residual.to(tl.float32)


@triton.jit
def _store_sum(summed, summed_ptr, rows, summed_row_stride, cols, mask):
    tl.store(
        summed_ptr + rows[:, None] * summed_row_stride + cols[None, :],
        summed.to(summed_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _normalize_store(summed, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride, cols, col_mask,
                     mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    # (s - mean) * rstd in halves: the same bits, and no overflow of s - mean near the float32 maximum.
    out = (summed * 0.5 - (mean * 0.5)[:, None]) * (rstd * 2.0)[:, None]
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * out_row_stride + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def add_layer_norm_forward_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    summed_ptr,
    n_rows,
    dim,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    summed_row_stride,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
    RETURN_SUM: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """``SPLIT = 3``: a whole row held as three ``BLOCK_N``-column blocks (D = 768 as 3 x 256)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # M * D can pass 2**31
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    # The shift of the mean: each row's first element, summed as the tiles are.
    first = tl.load(x_ptr + rows * x_row_stride, mask=row_mask, other=0.0).to(tl.float32)
    shift = first + tl.load(residual_ptr + rows * residual_row_stride, mask=row_mask, other=0.0).to(
        tl.float32
    )

    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]
    summed = _load_sum(x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, cols, mask)
    if RETURN_SUM:
        _store_sum(summed, summed_ptr, rows, summed_row_stride, cols, mask)
    if SPLIT == 3:
        cols1 = cols + BLOCK_N
        col_mask1 = cols1 < dim
        mask1 = row_mask[:, None] & col_mask1[None, :]
        summed1 = _load_sum(x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, cols1, mask1)
        cols2 = cols + 2 * BLOCK_N
        col_mask2 = cols2 < dim
        mask2 = row_mask[:, None] & col_mask2[None, :]
        summed2 = _load_sum(x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, cols2, mask2)
        if RETURN_SUM:
            _store_sum(summed1, summed_ptr, rows, summed_row_stride, cols1, mask1)
            _store_sum(summed2, summed_ptr, rows, summed_row_stride, cols2, mask2)
        mean, scale, q = _split3_stats(
            summed, summed1, summed2, mask, mask1, mask2, shift, dim.to(tl.float32)
        )
    else:
        count = tl.minimum(dim, BLOCK_N).to(tl.float32)
        mean, scale, q = _chunk_stats(summed, mask, shift, count)
    if CHUNKED:
        n = count
        for start in range(BLOCK_N, dim, BLOCK_N):
            chunk_cols = start + cols
            chunk_mask = row_mask[:, None] & (chunk_cols < dim)[None, :]
            chunk = _load_sum(
                x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, chunk_cols, chunk_mask
            )
            if RETURN_SUM:
                _store_sum(chunk, summed_ptr, rows, summed_row_stride, chunk_cols, chunk_mask)
            chunk_count = tl.minimum(dim - start, BLOCK_N).to(tl.float32)
            chunk_mean, chunk_scale, chunk_q = _chunk_stats(chunk, chunk_mask, shift, chunk_count)
            n, mean, scale, q = _merge_stats(n, mean, scale, q, chunk_count, chunk_mean, chunk_scale, chunk_q)
    rstd = _rstd(scale, q, dim, eps)

    if CHUNKED:
        for start in range(0, dim, BLOCK_N):
            chunk_cols = start + cols
            chunk_col_mask = chunk_cols < dim
            chunk_mask = row_mask[:, None] & chunk_col_mask[None, :]
            chunk = _load_sum(
                x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, chunk_cols, chunk_mask
            )
            _normalize_store(chunk, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride,
                             chunk_cols, chunk_col_mask, chunk_mask, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
    else:
        _normalize_store(summed, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride, cols,
                         col_mask, mask, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
        if SPLIT == 3:
            _normalize_store(summed1, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride, cols1,
                             col_mask1, mask1, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
            _normalize_store(summed2, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride, cols2,
                             col_mask2, mask2, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def add_layer_norm_backward_row_sums_kernel(
    grad_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    dim,
    grad_row_stride,
    x_row_stride,
    residual_row_stride,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``sums[row] = (mean(g), mean(g * x_hat))`` over a long row, chunk by chunk (``g = dy * weight``)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    acc_grad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_grad_x_hat = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_N):
        chunk_cols = start + cols
        col_mask = chunk_cols < dim
        x = tl.load(x_ptr + row * x_row_stride + chunk_cols, mask=col_mask, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + row * residual_row_stride + chunk_cols, mask=col_mask, other=0.0)
        grad = tl.load(grad_ptr + row * grad_row_stride + chunk_cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            grad = grad * tl.load(weight_ptr + chunk_cols, mask=col_mask, other=0.0).to(tl.float32)
        x_hat = tl.where(col_mask, (x + residual.to(tl.float32) - mean) * rstd, 0.0)
        acc_grad += grad
        acc_grad_x_hat += grad * x_hat
    tl.store(sums_ptr + 2 * row, tl.sum(acc_grad, axis=0) / dim)
    tl.store(sums_ptr + 2 * row + 1, tl.sum(acc_grad_x_hat, axis=0) / dim)


@triton.jit
def _backward_terms(grad_ptr, x_ptr, residual_ptr, weight, rows, cols, mask, mean, rstd, grad_row_stride,
                    x_row_stride, residual_row_stride, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """(dy, g = dy * weight, x_hat) of one ``[M, N]`` block of rows, float32."""
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    residual = tl.load(
        residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
    )
    grad = tl.load(grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    summed = x.to(tl.float32) + residual.to(tl.float32)
    x_hat = tl.where(mask, (summed - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        grad_hat = grad * weight[None, :]
    else:
        grad_hat = grad
    return grad, grad_hat, x_hat


@triton.jit
def _backward_store(grad_hat, x_hat, mean_grad, mean_grad_x_hat, rstd, dx_ptr, grad_sum_ptr, rows, cols, mask,
                    dx_row_stride, grad_sum_row_stride, GRAD_SUM: tl.constexpr):  # fmt: skip
    # d/ds of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight.
    dx = (grad_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
    if GRAD_SUM:  # the returned sum's gradient reaches x and residual directly
        dx += tl.load(
            grad_sum_ptr + rows[:, None] * grad_sum_row_stride + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
    tl.store(
        dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def add_layer_norm_backward_kernel(
    grad_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    dx_ptr,
    dweight_partial_ptr,
    dbias_partial_ptr,
    grad_sum_ptr,
    n_rows,
    dim,
    rows_per_program,
    grad_row_stride,
    x_row_stride,
    residual_row_stride,
    dx_row_stride,
    grad_sum_row_stride,
    HAS_WEIGHT: tl.constexpr,
    PARAM_GRADS: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GRAD_SUM: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """dx (and partial dweight/dbias) for a ``rows_per_program x BLOCK_N`` stripe: whole rows, or with
    ``ROW_SUMS`` one column chunk of rows whose row means come from the row-sums kernel. ``SPLIT = 3``:
    whole rows held as three ``BLOCK_N``-column blocks."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < dim
    weight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SPLIT == 3:
        cols1 = cols + BLOCK_N
        col_mask1 = cols1 < dim
        cols2 = cols + 2 * BLOCK_N
        col_mask2 = cols2 < dim
        weight1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        weight2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_WEIGHT:
            weight1 = tl.load(weight_ptr + cols1, mask=col_mask1, other=0.0).to(tl.float32)
            weight2 = tl.load(weight_ptr + cols2, mask=col_mask2, other=0.0).to(tl.float32)
        dweight_acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dbias_acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dweight_acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dbias_acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        grad, grad_hat, x_hat = _backward_terms(grad_ptr, x_ptr, residual_ptr, weight, rows, cols, mask, mean,
                                                rstd, grad_row_stride, x_row_stride, residual_row_stride,
                                                HAS_WEIGHT)  # fmt: skip
        if ROW_SUMS:
            mean_grad = tl.load(sums_ptr + 2 * rows, mask=row_mask, other=0.0)
            mean_grad_x_hat = tl.load(sums_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
        elif SPLIT == 3:
            mask1 = row_mask[:, None] & col_mask1[None, :]
            mask2 = row_mask[:, None] & col_mask2[None, :]
            grad1, grad_hat1, x_hat1 = _backward_terms(grad_ptr, x_ptr, residual_ptr, weight1, rows, cols1,
                                                       mask1, mean, rstd, grad_row_stride, x_row_stride,
                                                       residual_row_stride, HAS_WEIGHT)  # fmt: skip
            grad2, grad_hat2, x_hat2 = _backward_terms(grad_ptr, x_ptr, residual_ptr, weight2, rows, cols2,
                                                       mask2, mean, rstd, grad_row_stride, x_row_stride,
                                                       residual_row_stride, HAS_WEIGHT)  # fmt: skip
            mean_grad = (
                tl.sum(grad_hat, axis=1) + tl.sum(grad_hat1, axis=1) + tl.sum(grad_hat2, axis=1)
            ) / dim
            mean_grad_x_hat = (tl.sum(grad_hat * x_hat, axis=1) + tl.sum(grad_hat1 * x_hat1, axis=1)
                               + tl.sum(grad_hat2 * x_hat2, axis=1)) / dim  # fmt: skip
        else:
            mean_grad = tl.sum(grad_hat, axis=1) / dim
            mean_grad_x_hat = tl.sum(grad_hat * x_hat, axis=1) / dim
        _backward_store(grad_hat, x_hat, mean_grad, mean_grad_x_hat, rstd, dx_ptr, grad_sum_ptr, rows, cols,
                        mask, dx_row_stride, grad_sum_row_stride, GRAD_SUM)  # fmt: skip
        if PARAM_GRADS:
            dweight_acc += tl.sum(grad * x_hat, axis=0)
            dbias_acc += tl.sum(grad, axis=0)
        if SPLIT == 3:
            _backward_store(grad_hat1, x_hat1, mean_grad, mean_grad_x_hat, rstd, dx_ptr, grad_sum_ptr, rows,
                            cols1, mask1, dx_row_stride, grad_sum_row_stride, GRAD_SUM)  # fmt: skip
            _backward_store(grad_hat2, x_hat2, mean_grad, mean_grad_x_hat, rstd, dx_ptr, grad_sum_ptr, rows,
                            cols2, mask2, dx_row_stride, grad_sum_row_stride, GRAD_SUM)  # fmt: skip
            if PARAM_GRADS:
                dweight_acc1 += tl.sum(grad1 * x_hat1, axis=0)
                dbias_acc1 += tl.sum(grad1, axis=0)
                dweight_acc2 += tl.sum(grad2 * x_hat2, axis=0)
                dbias_acc2 += tl.sum(grad2, axis=0)

    if PARAM_GRADS:
        partial = pid.to(tl.int64) * dim
        tl.store(dweight_partial_ptr + partial + cols, dweight_acc, mask=col_mask)
        tl.store(dbias_partial_ptr + partial + cols, dbias_acc, mask=col_mask)
        if SPLIT == 3:
            tl.store(dweight_partial_ptr + partial + cols1, dweight_acc1, mask=col_mask1)
            tl.store(dbias_partial_ptr + partial + cols1, dbias_acc1, mask=col_mask1)
            tl.store(dweight_partial_ptr + partial + cols2, dweight_acc2, mask=col_mask2)
            tl.store(dbias_partial_ptr + partial + cols2, dbias_acc2, mask=col_mask2)


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    chunked: bool  # rows longer than block_n: column chunks
    split: int = 1  # whole rows held as this many block_n-column blocks (1 or 3)


def _num_warps(block_elements: int) -> int:
    if block_elements >= 8192:
        return 16
    if block_elements >= 2048:
        return 8
    return 4


def _check_dim(dim: int) -> None:
    if dim > MAX_DIM:
        raise ValueError(
            f"the triton add_layer_norm kernels take a last dimension up to {MAX_DIM}, got {dim}"
        )


def _block_n(dim: int) -> int:
    return min(max(triton.next_power_of_2(dim), MIN_BLOCK_N), ROW_BLOCK_MAX)


def _split(dim: int) -> tuple[int, int]:
    """(split, block_n) of a whole row: three power-of-two blocks where they pad the row less than one
    power-of-two block does (768 = 3 x 256 instead of 1024 with a quarter idle; 3072 = 3 x 1024; 700 in
    3 x 256), else one."""
    one = _block_n(dim)
    third = max(triton.next_power_of_2(triton.cdiv(dim, 3)), MIN_BLOCK_N)
    if dim <= ROW_BLOCK_MAX and 3 * third < one:
        return 3, third
    return 1, one


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def forward_tile(dim: int, n_rows: int | None = None, interpret: bool = False) -> Tile:
    """The forward's tile for rows of ``dim`` columns. On a GPU it depends on ``dim`` only; the
    interpreter takes more rows per program, up to ``n_rows``."""
    _check_dim(dim)
    split, block_n = _split(dim)
    width = split * block_n
    chunked = dim > width
    if chunked:
        block_m = 1
    elif interpret:
        block_m = min(_INTERPRETER_ELEMENTS // width, triton.next_power_of_2(max(n_rows or 1, 1)))
    else:
        block_m = GPU_ELEMENTS // width
    block_m = _prev_power_of_2(block_m)
    # Tiles of many short rows keep three row reductions live per row: 8 warps reach ptxas's 128-register
    # cap there (and spill in bf16 at 64 x 64), 16 warps hold them in about 80.
    num_warps = 16 if block_m >= 32 and not interpret else _num_warps(block_m * width)
    if split > 1:  # warps for one block: each thread then holds 16 bytes of a block's row (128-bit access)
        num_warps = _num_warps(block_m * block_n)
    return Tile(block_m, block_n, num_warps, chunked, split)


def backward_tile(dim: int, n_rows: int | None = None, interpret: bool = False) -> Tile:
    """The backward's tile: as the forward's (a chunked row is a column chunk of several rows), with
    warps for about twice the live registers of the forward."""
    _check_dim(dim)
    split, block_n = _split(dim)
    width = split * block_n
    if interpret:
        block_m = min(_INTERPRETER_ELEMENTS // width, triton.next_power_of_2(max(n_rows or 1, 1)))
    else:
        block_m = GPU_ELEMENTS // width
    block_m = _prev_power_of_2(block_m)
    num_warps = _num_warps(2 * block_m * width) if split == 1 else _num_warps(block_m * block_n)
    return Tile(block_m, block_n, num_warps, dim > width, split)


def row_sums_warps(tile: Tile) -> int:
    return _num_warps(tile.block_n)


def forward_grid(n_rows: int, dim: int, interpret: bool = False) -> tuple[int]:
    """Launch grid of the forward kernel: row blocks on axis 0 (up to 2**31 - 1 programs)."""
    return (triton.cdiv(n_rows, forward_tile(dim, n_rows, interpret).block_m),)


def _backward_programs(n_rows: int, tile: Tile, device: torch.device | None) -> tuple[int, int]:
    """(programs, rows per program) of the backward kernel."""
    n_row_blocks = triton.cdiv(n_rows, tile.block_m)
    if device is not None and device.type == "cuda":
        # A few programs per SM: enough to hide latency, few enough that summing partials is cheap.
        wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        wanted = 4
    programs = min(n_row_blocks, wanted)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), tile.block_m) * tile.block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def backward_grid(n_rows: int, dim: int, programs: int, interpret: bool = False) -> tuple[int, int]:
    """Launch grid of the backward kernel: (row programs, column chunks); axis 1 holds at most
    ``MAX_DIM / ROW_BLOCK_MAX`` programs."""
    tile = backward_tile(dim, n_rows, interpret)
    return (programs, triton.cdiv(dim, tile.split * tile.block_n))


def backward_row_sums_grid(n_rows: int) -> tuple[int]:
    return (n_rows,)


# --- launchers ---------------------------------------------------------------------------------------


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _param(param: torch.Tensor | None, x_rows: torch.Tensor) -> torch.Tensor:
    """A weight or bias as the kernels read it: in its own dtype (float32 or x's), widened to float32
    in registers, so a call casts nothing; an absent one passes x's pointer, never read."""
    return x_rows if param is None else param


def _param_pair(weight, bias):
    """Weight and bias of one dtype, as modules hold them, pass as they are; a mixed pair (one float32,
    one of x's dtype) is read as float32 (a cast of [D] values), so no mixed variant is compiled."""
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return weight.float(), bias.float()
    return weight, bias


def add_layer_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    return_residual: bool = False,
    summed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd, summed)``: ``summed = x + residual`` in x's dtype with ``return_residual``,
    else an empty ``[0]`` tensor. ``out`` and ``summed`` (contiguous, x's shape) let tests pass
    poisoned buffers."""
    dim = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not return_residual:
        summed = x.new_empty((0,))
    elif summed is None:
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean, rstd = _stats_like(x), _stats_like(x)
    if x.numel() == 0:
        # Rows of length 0 have no statistics; zeros keep the saved tensors finite.
        return out, mean.zero_(), rstd.zero_(), summed
    x_rows, residual_rows, out_rows = as_rows(x), as_rows(residual), out.view(-1, dim)
    summed_rows = summed.view(-1, dim) if return_residual else out_rows  # never written without it
    n_rows = x_rows.shape[0]
    interpret = x.device.type != "cuda" and interpreting()
    tile = forward_tile(dim, n_rows, interpret)
    weight, bias = _param_pair(weight, bias)
    add_layer_norm_forward_kernel[forward_grid(n_rows, dim, interpret)](
        x_rows, residual_rows, _param(weight, x_rows), _param(bias, x_rows), out_rows, mean, rstd,
        summed_rows, n_rows, dim, x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0),
        summed_rows.stride(0), eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, CHUNKED=tile.chunked, RETURN_SUM=return_residual,
        SPLIT=tile.split, num_warps=tile.num_warps,
    )  # fmt: skip
    return out, mean, rstd, summed


def add_layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    out: torch.Tensor | None = None,
    grad_summed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``: ``dx`` serves x and residual and includes ``grad_summed``, the
    gradient of the returned ``x + residual`` (``None``: none); a missing parameter gets a ``[0]`` grad."""
    dim = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    param_grads = weight is not None or bias is not None
    if x.numel() == 0 or not param_grads:
        partial = torch.zeros((1, dim), dtype=torch.float32, device=x.device)
        dweight_partial, dbias_partial = partial, partial
    if x.numel() > 0:
        x_rows, residual_rows, grad_rows = as_rows(x), as_rows(residual), as_rows(grad_out)
        dx_rows = dx.view(-1, dim)
        n_rows = x_rows.shape[0]
        interpret = x.device.type != "cuda" and interpreting()
        # The tile also bounds the dweight/dbias accumulators each program keeps in registers.
        tile = backward_tile(dim, n_rows, interpret)
        programs, rows_per_program = _backward_programs(n_rows, tile, x.device)
        if param_grads:
            dweight_partial = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
            dbias_partial = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
        mean, rstd = mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()
        weight_arg = _param(weight, x_rows)
        if tile.chunked:
            sums = torch.empty((n_rows, 2), dtype=torch.float32, device=x.device)
            add_layer_norm_backward_row_sums_kernel[backward_row_sums_grid(n_rows)](
                grad_rows, x_rows, residual_rows, weight_arg, mean, rstd, sums, dim, grad_rows.stride(0),
                x_rows.stride(0), residual_rows.stride(0), HAS_WEIGHT=weight is not None,
                BLOCK_N=tile.block_n, num_warps=row_sums_warps(tile),
            )  # fmt: skip
        else:
            sums = mean  # not read
        grad_sum_rows = grad_rows if grad_summed is None else as_rows(grad_summed)  # read only with GRAD_SUM
        add_layer_norm_backward_kernel[backward_grid(n_rows, dim, programs, interpret)](
            grad_rows, x_rows, residual_rows, weight_arg, mean, rstd, sums, dx_rows,
            dweight_partial, dbias_partial, grad_sum_rows, n_rows, dim, rows_per_program,
            grad_rows.stride(0), x_rows.stride(0), residual_rows.stride(0), dx_rows.stride(0),
            grad_sum_rows.stride(0), HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads,
            ROW_SUMS=tile.chunked, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            GRAD_SUM=grad_summed is not None, SPLIT=tile.split, num_warps=tile.num_warps,
        )  # fmt: skip
    dweight = _reduce(dweight_partial, weight, x)
    dbias = _reduce(dbias_partial, bias, x)
    return dx, dweight, dbias


def _reduce(partial: torch.Tensor, param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if param is None:
        return torch.empty((0,), dtype=x.dtype, device=x.device)
    return partial.sum(dim=0).to(param.dtype)


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dims() -> Iterator[int]:
    """One row length per tile class: every power of two up to MAX_DIM, and three times each power of
    two whose three blocks fit a whole row (48 to 3072: the split tiles)."""
    dim = MIN_BLOCK_N
    while dim <= MAX_DIM:
        yield dim
        if 3 * dim <= ROW_BLOCK_MAX:
            yield 3 * dim
        dim *= 2


def _param_types(dtype: str) -> list[str | None]:
    """Pointer types of a weight or bias as launched: absent (x's pointer), float32 or x's dtype
    (read as given: see _param)."""
    return [None, "*fp32"] if dtype == "fp32" else [None, "*fp32", f"*{dtype}"]


def _class_label(tile: Tile) -> str:
    if tile.split > 1:
        return f"D<={tile.split * tile.block_n} as {tile.split} x {tile.block_n}"
    return f"D<={tile.block_n}" + (" chunked" if tile.chunked else "")


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps) the launchers can choose on a GPU: the tiles come
    from forward_tile/backward_tile for one row length per tile class, for every dtype and with and
    without weight and bias."""
    seen: set[tuple] = set()
    floats = {"eps": "fp32"}
    stats = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "sums_ptr": "*fp32"}
    partials = {"dweight_partial_ptr": "*fp32", "dbias_partial_ptr": "*fp32"}

    def launch(kernel, constexprs, pointers, num_warps, label, tags):
        signature = kernel_signature(kernel, constexprs, pointers, floats)
        key = (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), num_warps)
        if key in seen:
            return []
        seen.add(key)
        return [KernelLaunch(kernel, signature, constexprs, num_warps, label=label, tags=tags)]

    for dtype in _DTYPES.values():
        data = f"*{dtype}"
        rows = {"x_ptr": data, "residual_ptr": data}
        for dim in _dims():
            tags = {"dtype": dtype, "dim": dim}
            tile = forward_tile(dim)
            label = f"forward {dtype} {_class_label(tile)}"
            for weight_type in _param_types(dtype):
                for bias_type in _param_types(dtype):
                    if weight_type and bias_type and weight_type != bias_type:
                        continue  # a mixed pair is launched as float32 (_param_pair)
                    param_dtype = (weight_type or bias_type or "*fp32")[1:]
                    for return_sum in (False, True):
                        constexprs = {
                            "HAS_WEIGHT": weight_type is not None, "HAS_BIAS": bias_type is not None,
                            "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "CHUNKED": tile.chunked,
                            "RETURN_SUM": return_sum, "SPLIT": tile.split,
                        }  # fmt: skip
                        pointers = {
                            **rows, **stats, "out_ptr": data, "summed_ptr": data,
                            "weight_ptr": weight_type or data, "bias_ptr": bias_type or data,
                        }  # fmt: skip
                        yield from launch(add_layer_norm_forward_kernel, constexprs, pointers, tile.num_warps,
                                          label, {**tags, "param_dtype": param_dtype})  # fmt: skip
            tile = backward_tile(dim)
            label = f"backward {dtype} {_class_label(tile)}"
            for weight_type in _param_types(dtype):
                # A weight always asks for parameter gradients; without one, a bias may or may not.
                for param_grads in (True,) if weight_type else (False, True):
                    for grad_sum in (False, True):
                        constexprs = {
                            "HAS_WEIGHT": weight_type is not None, "PARAM_GRADS": param_grads,
                            "ROW_SUMS": tile.chunked, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                            "GRAD_SUM": grad_sum, "SPLIT": tile.split,
                        }  # fmt: skip
                        pointers = {**rows, **stats, **partials, "grad_ptr": data, "dx_ptr": data,
                                    "grad_sum_ptr": data, "weight_ptr": weight_type or data}  # fmt: skip
                        param_tags = {**tags, "param_dtype": (weight_type or "*fp32")[1:]}
                        kernel = add_layer_norm_backward_kernel
                        yield from launch(kernel, constexprs, pointers, tile.num_warps, label, param_tags)
                if tile.chunked:
                    constexprs = {"HAS_WEIGHT": weight_type is not None, "BLOCK_N": tile.block_n}
                    pointers = {**rows, **stats, "grad_ptr": data, "weight_ptr": weight_type or data}
                    yield from launch(add_layer_norm_backward_row_sums_kernel, constexprs, pointers,
                                      row_sums_warps(tile), f"backward row sums {dtype}",
                                      {**tags, "param_dtype": (weight_type or "*fp32")[1:]})  # fmt: skip


def _contiguous_launch(constexprs: dict) -> dict[str, int]:
    """Argument values of a launch on contiguous ``[M, D]`` tensors from torch's allocator, on which
    Triton specializes (bench/kernel_budget.py compiles what such a launch compiles): pointers 16-byte
    aligned, ``D`` the widest row of the tile class (a multiple of 16 from 16 up: 768 for 3 x 256) and
    row strides of ``D``. ``n_rows`` and ``rows_per_program`` are left general; rows longer than one
    block (chunked) take ``D`` as two blocks and a half (not a multiple of the block)."""
    block_n = constexprs["BLOCK_N"]
    dim = constexprs.get("SPLIT", 1) * block_n
    whole_rows = "CHUNKED" in constexprs or "ROW_SUMS" in constexprs  # not the row-sums kernel
    if not whole_rows or constexprs.get("CHUNKED") or constexprs.get("ROW_SUMS"):
        dim = 5 * block_n // 2
    values = {name: 16 for name in ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "out_ptr", "mean_ptr",
                                    "rstd_ptr", "summed_ptr", "grad_ptr", "sums_ptr", "dx_ptr",
                                    "dweight_partial_ptr", "dbias_partial_ptr", "grad_sum_ptr")}  # fmt: skip
    values["dim"] = dim
    for name in ("x_row_stride", "residual_row_stride", "out_row_stride", "summed_row_stride",
                 "grad_row_stride", "dx_row_stride", "grad_sum_row_stride"):  # fmt: skip
        values[name] = dim
    return values


LAUNCH_SPECIALIZATION = {
    kernel.fn.__name__: _contiguous_launch
    for kernel in (
        add_layer_norm_forward_kernel,
        add_layer_norm_backward_kernel,
        add_layer_norm_backward_row_sums_kernel,
    )  # fmt: skip
}
