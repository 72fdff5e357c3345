"""Fused residual add + LayerNorm forward and backward in Triton.

Inputs are viewed as rows ``[M, D]`` (unit stride along the last dim, any row stride). Rows of up to
``ROW_BLOCK_MAX`` columns are held whole in registers: ``BLOCK_N = next_power_of_2(D)`` columns and,
for small ``D``, ``BLOCK_M`` rows at once so each program still has enough work. Longer rows (up to
``MAX_DIM``) are processed in column chunks of ``ROW_BLOCK_MAX``, so no configuration needs more
registers than the whole-row ones. Statistics and math are float32; storage is in the input dtype;
weight and bias may be float32 or the input dtype.

Statistics are exact at the edges of float32:

* the mean is ``s0 + mean(s - s0)`` with ``s0`` the row's first element, so a row of identical values
  has exactly its value as mean and normalizes to exactly 0;
* the variance is two-pass (mean-subtracted, never ``E[s^2] - E[s]^2``) and scaled: squares are
  taken of ``(s - mean) / max|s - mean|``, so rows whose magnitude nears 1e19 or more, whose squares
  overflow float32, still give the finite ``rstd``. Column chunks are combined with the pairwise
  (Chan et al.) update in the same scaled form.

The forward writes ``out`` and the per-row ``mean`` and ``rstd`` (float32). The backward recomputes
``x + residual`` from both inputs rather than reading a saved sum: the forward then moves three
rows instead of four, a training step moves the same seven, and no extra activation is stored.
The backward writes one ``dx`` (``d/dx == d/dresidual``) and per-program partial sums of
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

# Nothing spills at any configuration the launchers choose (checked for sm_90 by launch_configs()).
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {}


@triton.jit
def _chunk_stats(summed, mask, shift, count):
    """Mean, scale and scaled sum of squares of each row of ``summed`` [M, N] over ``mask``.

    ``mean = shift + sum(s - shift) / count``; ``scale = max|s - mean|`` (1 when that is 0 or tiny,
    where nothing can overflow); ``q = sum(((s - mean) / scale)^2)``, so that the row's sum of
    squared deviations is ``scale^2 * q`` without ever forming a square that overflows.
    """
    mean = shift + tl.sum(tl.where(mask, summed - shift[:, None], 0.0), axis=1) / count
    centered = tl.where(mask, summed - mean[:, None], 0.0)
    largest = tl.max(tl.abs(centered), axis=1)
    scale = tl.where(largest > 1e-30, largest, 1.0)
    scaled = centered / scale[:, None]
    return mean, scale, tl.sum(scaled * scaled, axis=1)


@triton.jit
def _merge_stats(n_a, mean_a, scale_a, q_a, n_b, mean_b, scale_b, q_b):
    """Pairwise update of (count, mean, scale, scaled sum of squares) for two disjoint parts of a row."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    scale = tl.maximum(tl.maximum(scale_a, scale_b), tl.abs(delta))
    ra = scale_a / scale
    rb = scale_b / scale
    rd = delta / scale
    q = q_a * ra * ra + q_b * rb * rb + rd * rd * (n_a * (n_b / n))
    return n, mean, scale, q


@triton.jit
def _rstd(scale, q, dim, eps):
    """``1 / sqrt(scale^2 * q / dim + eps)`` without overflow when ``scale`` is huge."""
    var_scaled = q / dim
    large = 1.0 / (scale * tl.sqrt(var_scaled + (eps / scale) / scale))
    small = 1.0 / tl.sqrt(var_scaled * scale * scale + eps)
    return tl.where(scale > 1.0, large, small)


@triton.jit
def _load_sum(x_ptr, residual_ptr, rows, x_row_stride, residual_row_stride, cols, mask):
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    residual = tl.load(
        residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
    )
    return x.to(tl.float32) + residual.to(tl.float32)


@triton.jit
def _normalize_store(summed, mean, rstd, weight_ptr, bias_ptr, out_ptr, rows, out_row_stride, cols, col_mask,
                     mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    out = (summed - mean[:, None]) * rstd[:, None]
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
    n_rows,
    dim,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
):
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
    n_rows,
    dim,
    rows_per_program,
    grad_row_stride,
    x_row_stride,
    residual_row_stride,
    dx_row_stride,
    HAS_WEIGHT: tl.constexpr,
    PARAM_GRADS: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx (and partial dweight/dbias) for a ``rows_per_program x BLOCK_N`` stripe: whole rows, or with
    ``ROW_SUMS`` one column chunk of rows whose row means come from the row-sums kernel."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < dim
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)

        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        residual = tl.load(
            residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
        )
        grad = tl.load(grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], mask=mask, other=0.0)
        grad = grad.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        summed = x.to(tl.float32) + residual.to(tl.float32)
        x_hat = tl.where(mask, (summed - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            grad_hat = grad * weight[None, :]
        else:
            grad_hat = grad
        # d/ds of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight.
        if ROW_SUMS:
            mean_grad = tl.load(sums_ptr + 2 * rows, mask=row_mask, other=0.0)
            mean_grad_x_hat = tl.load(sums_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
        else:
            mean_grad = tl.sum(grad_hat, axis=1) / dim
            mean_grad_x_hat = tl.sum(grad_hat * x_hat, axis=1) / dim
        dx = (grad_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
        dx_offsets = rows[:, None] * dx_row_stride + cols[None, :]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        if PARAM_GRADS:
            dweight_acc += tl.sum(grad * x_hat, axis=0)
            dbias_acc += tl.sum(grad, axis=0)

    if PARAM_GRADS:
        tl.store(dweight_partial_ptr + pid.to(tl.int64) * dim + cols, dweight_acc, mask=col_mask)
        tl.store(dbias_partial_ptr + pid.to(tl.int64) * dim + cols, dbias_acc, mask=col_mask)


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    chunked: bool  # rows longer than block_n: column chunks


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


def forward_tile(dim: int, n_rows: int | None = None, interpret: bool = False) -> Tile:
    """The forward's tile for rows of ``dim`` columns. On a GPU it depends on ``dim`` only; the
    interpreter takes more rows per program, up to ``n_rows``."""
    _check_dim(dim)
    block_n = _block_n(dim)
    chunked = dim > block_n
    if chunked:
        block_m = 1
    elif interpret:
        block_m = max(1, min(_INTERPRETER_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows or 1, 1))))
    else:
        block_m = max(1, GPU_ELEMENTS // block_n)
    # Tiles of many short rows keep three row reductions live per row: 8 warps reach ptxas's 128-register
    # cap there (and spill in bf16 at 64 x 64), 16 warps hold them in about 80.
    num_warps = 16 if block_m >= 32 and not interpret else _num_warps(block_m * block_n)
    return Tile(block_m, block_n, num_warps, chunked)


def backward_tile(dim: int, n_rows: int | None = None, interpret: bool = False) -> Tile:
    """The backward's tile: as the forward's (a chunked row is a column chunk of several rows), with
    warps for about twice the live registers of the forward."""
    _check_dim(dim)
    block_n = _block_n(dim)
    if interpret:
        block_m = max(1, min(_INTERPRETER_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows or 1, 1))))
    else:
        block_m = max(1, GPU_ELEMENTS // block_n)
    return Tile(block_m, block_n, _num_warps(2 * block_m * block_n), dim > block_n)


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
    return (programs, triton.cdiv(dim, tile.block_n))


def backward_row_sums_grid(n_rows: int) -> tuple[int]:
    return (n_rows,)


# --- launchers ---------------------------------------------------------------------------------------


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _param(param: torch.Tensor | None, x_rows: torch.Tensor) -> torch.Tensor:
    """A weight or bias as the kernels read it: float32 (one compiled variant per dtype of x, and the
    math is float32 anyway); an absent one passes x's pointer, never read."""
    return x_rows if param is None else param.to(torch.float32)


def add_layer_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``; ``out`` (contiguous, x's shape) lets tests pass a poisoned buffer."""
    dim = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean, rstd = _stats_like(x), _stats_like(x)
    if x.numel() == 0:
        # Rows of length 0 have no statistics; zeros keep the saved tensors finite.
        return out, mean.zero_(), rstd.zero_()
    x_rows, residual_rows, out_rows = as_rows(x), as_rows(residual), out.view(-1, dim)
    n_rows = x_rows.shape[0]
    interpret = x.device.type != "cuda" and interpreting()
    tile = forward_tile(dim, n_rows, interpret)
    add_layer_norm_forward_kernel[forward_grid(n_rows, dim, interpret)](
        x_rows, residual_rows, _param(weight, x_rows), _param(bias, x_rows), out_rows, mean, rstd, n_rows,
        dim, x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        CHUNKED=tile.chunked, num_warps=tile.num_warps,
    )  # fmt: skip
    return out, mean, rstd


def add_layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``: ``dx`` serves x and residual; a missing parameter gets a ``[0]`` grad."""
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
        add_layer_norm_backward_kernel[backward_grid(n_rows, dim, programs, interpret)](
            grad_rows, x_rows, residual_rows, weight_arg, mean, rstd, sums, dx_rows,
            dweight_partial, dbias_partial, n_rows, dim, rows_per_program, grad_rows.stride(0),
            x_rows.stride(0), residual_rows.stride(0), dx_rows.stride(0),
            HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads, ROW_SUMS=tile.chunked,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
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
    """One row length per tile class: every power of two up to MAX_DIM (each tile class holds one)."""
    dim = MIN_BLOCK_N
    while dim <= MAX_DIM:
        yield dim
        dim *= 2


def _param_types(dtype: str) -> list[str | None]:
    """Pointer types of a weight or bias as launched: absent (x's pointer) or float32 (see _param)."""
    return [None, "*fp32"]


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
            label = f"forward {dtype} D<={tile.block_n}" + (" chunked" if tile.chunked else "")
            for weight_type in _param_types(dtype):
                for bias_type in _param_types(dtype):
                    constexprs = {
                        "HAS_WEIGHT": weight_type is not None, "HAS_BIAS": bias_type is not None,
                        "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "CHUNKED": tile.chunked,
                    }  # fmt: skip
                    pointers = {**rows, **stats, "out_ptr": data, "weight_ptr": weight_type or data,
                                "bias_ptr": bias_type or data}  # fmt: skip
                    yield from launch(
                        add_layer_norm_forward_kernel, constexprs, pointers, tile.num_warps, label, tags
                    )
            tile = backward_tile(dim)
            label = f"backward {dtype} D<={tile.block_n}" + (" chunked" if tile.chunked else "")
            for weight_type in _param_types(dtype):
                # A weight always asks for parameter gradients; without one, a bias may or may not.
                for param_grads in (True,) if weight_type else (False, True):
                    constexprs = {
                        "HAS_WEIGHT": weight_type is not None, "PARAM_GRADS": param_grads,
                        "ROW_SUMS": tile.chunked, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                    }  # fmt: skip
                    pointers = {**rows, **stats, **partials, "grad_ptr": data, "dx_ptr": data,
                                "weight_ptr": weight_type or data}  # fmt: skip
                    yield from launch(
                        add_layer_norm_backward_kernel, constexprs, pointers, tile.num_warps, label, tags
                    )
                if tile.chunked:
                    constexprs = {"HAS_WEIGHT": weight_type is not None, "BLOCK_N": tile.block_n}
                    pointers = {**rows, **stats, "grad_ptr": data, "weight_ptr": weight_type or data}
                    yield from launch(add_layer_norm_backward_row_sums_kernel, constexprs, pointers,
                                      row_sums_warps(tile), f"backward row sums {dtype}", tags)  # fmt: skip
