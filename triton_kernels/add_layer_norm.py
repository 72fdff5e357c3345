"""Fused residual add + LayerNorm forward and backward in Triton.

Inputs are viewed as rows ``[M, D]`` (unit stride along the last dim, any row stride). A program
holds whole rows in registers: ``BLOCK_N = next_power_of_2(D)`` columns and, for small ``D``,
``BLOCK_M`` rows at once so each program still has enough work. Statistics and math are float32;
storage is in the input dtype; weight and bias may be float32 or the input dtype.

The forward writes ``out`` and the per-row ``mean`` and ``rstd`` (float32). The backward recomputes
``x + residual`` from both inputs rather than reading a saved sum: the forward then moves three
rows instead of four, a training step moves the same seven, and no extra activation is stored.
The backward writes one ``dx`` (``d/dx == d/dresidual``) and per-program partial sums of
``dweight``/``dbias`` into ``[num_programs, D]`` float32 buffers that are summed afterwards, which
avoids atomics and keeps the reduction deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import as_rows, elements_per_program

# Rows longer than this do not fit one program's registers.
MAX_DIM = 65536


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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)  # M * D can pass 2**31

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    residual = tl.load(
        residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
    )
    summed = x.to(tl.float32) + residual.to(tl.float32)
    mean = tl.sum(summed, axis=1) / dim
    # Two-pass variance on the register-resident row: no cancellation from E[s^2] - E[s]^2.
    centered = tl.where(mask, summed - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / dim
    rstd = 1.0 / tl.sqrt(var + eps)
    out = centered * rstd[:, None]
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    out_offsets = rows[:, None] * out_row_stride + cols[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def add_layer_norm_backward_kernel(
    grad_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
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
        mean_grad = tl.sum(grad_hat, axis=1) / dim
        mean_grad_x_hat = tl.sum(grad_hat * x_hat, axis=1) / dim
        dx = (grad_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
        dx_offsets = rows[:, None] * dx_row_stride + cols[None, :]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        if PARAM_GRADS:
            dweight_acc += tl.sum(grad * x_hat, axis=0)
            dbias_acc += tl.sum(grad, axis=0)

    if PARAM_GRADS:
        tl.store(dweight_partial_ptr + pid * dim + cols, dweight_acc, mask=col_mask)
        tl.store(dbias_partial_ptr + pid * dim + cols, dbias_acc, mask=col_mask)


def _num_warps(block_elements: int) -> int:
    if block_elements >= 32768:
        return 32
    if block_elements >= 8192:
        return 16
    if block_elements >= 2048:
        return 8
    return 4


def _tile(n_rows: int, dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows, several of them when ``D`` is small."""
    if dim > MAX_DIM:
        raise ValueError(
            f"the triton add_layer_norm kernels take a last dimension up to {MAX_DIM}, got {dim}"
        )
    block_n = triton.next_power_of_2(dim)
    block_m = max(1, min(elements_per_program(device) // block_n, triton.next_power_of_2(n_rows)))
    return block_m, block_n


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


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
    block_m, block_n = _tile(n_rows, dim, x.device)
    add_layer_norm_forward_kernel[(triton.cdiv(n_rows, block_m),)](
        x_rows, residual_rows, x_rows if weight is None else weight, x_rows if bias is None else bias,
        out_rows, mean, rstd, n_rows, dim, x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=_num_warps(block_m * block_n),
    )  # fmt: skip
    return out, mean, rstd


def _num_programs(n_row_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few programs per SM: enough to hide latency, few enough that summing partials is cheap.
        return min(n_row_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_row_blocks, 4)


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
        # The tile also bounds the dweight/dbias accumulators each program keeps in registers.
        block_m, block_n = _tile(n_rows, dim, x.device)
        programs = _num_programs(triton.cdiv(n_rows, block_m), x.device)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
        programs = triton.cdiv(n_rows, rows_per_program)
        if param_grads:
            dweight_partial = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
            dbias_partial = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
        mean, rstd = mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()
        add_layer_norm_backward_kernel[(programs,)](
            grad_rows, x_rows, residual_rows, x_rows if weight is None else weight, mean, rstd, dx_rows,
            dweight_partial, dbias_partial, n_rows, dim, rows_per_program, grad_rows.stride(0),
            x_rows.stride(0), residual_rows.stride(0), dx_rows.stride(0),
            HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=_num_warps(2 * block_m * block_n),  # about twice the live registers of the forward
        )  # fmt: skip
    dweight = _reduce(dweight_partial, weight, x)
    dbias = _reduce(dbias_partial, bias, x)
    return dx, dweight, dbias


def _reduce(partial: torch.Tensor, param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if param is None:
        return torch.empty((0,), dtype=x.dtype, device=x.device)
    return partial.sum(dim=0).to(param.dtype)
