"""GEGLU forward and backward in Triton.

The input is viewed as rows ``[M, 2H]`` (unit stride along the last dim, any row stride); each
program handles a ``BLOCK_M x BLOCK_N`` tile of the output so loads along a row stay contiguous
and vectorize. Math in float32; storage in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import as_rows, elements_per_program


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    # Literals, not module globals: compiled @triton.jit code cannot read non-constexpr globals.
    SQRT_HALF = 0.7071067811865476  # 1/sqrt(2)
    INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2*pi)
    SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi)
    TANH_CUBIC = 0.044715
    if APPROX_TANH:
        # 0.5 * (1 + tanh(u)) = sigmoid(2u) = s and 1 - s = sigmoid(-2u) = 1 / (1 + 1/e), e = exp(-2u):
        # neither 1 + tanh(u) nor 1 - tanh^2 is formed, so nothing cancels where tanh(u) is near -1 or
        # 1. e is not clamped: it reaches inf for very negative gates (u is -inf once g^3 overflows),
        # where s is 0 and 1 - s is 1, the exact limits.
        u = SQRT_2_OVER_PI * (g + TANH_CUBIC * g * g * g)
        e = tl.exp(-2.0 * u)
        s = 1.0 / (1.0 + e)
        # g * s is inf * 0 at g = -inf: the limit there is 0 (and NaN gates still give NaN).
        gelu = tl.where(s == 0.0, 0.0, g * s)
        if NEED_GRAD:
            one_minus_s = 1.0 / (1.0 + 1.0 / e)
            ss = s * one_minus_s
            # du grows like g^2 and overflows for huge |g|, where s * (1 - s) is 0: the term is 0 there.
            du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * g * g)
            grad = s + tl.where(ss == 0.0, 0.0, 2.0 * g * ss * du)
        else:
            grad = gelu
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * SQRT_HALF))
        gelu = tl.where(cdf == 0.0, 0.0, g * cdf)  # the limit 0 at g = -inf (not inf * 0)
        if NEED_GRAD:
            pdf = tl.exp(-0.5 * g * g)
            grad = cdf + tl.where(pdf == 0.0, 0.0, g * INV_SQRT_2PI * pdf)  # 0, not inf * 0, at +-inf
        else:
            grad = gelu
    return gelu, grad


@triton.jit
def geglu_forward_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    hidden,
    x_row_stride,
    out_row_stride,
    APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # int64 rows: M * 2H can pass 2**31 (and so can M with a tiny H).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < hidden)
    x_offsets = rows[:, None] * x_row_stride + cols[None, :]
    value = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + x_offsets + hidden, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(gate, APPROX_TANH, False)
    out = value * gelu
    out_offsets = rows[:, None] * out_row_stride + cols[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def geglu_backward_kernel(
    grad_ptr,
    x_ptr,
    dx_ptr,
    n_rows,
    hidden,
    grad_row_stride,
    x_row_stride,
    dx_row_stride,
    APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < hidden)
    x_offsets = rows[:, None] * x_row_stride + cols[None, :]
    value = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + x_offsets + hidden, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    gelu, gelu_grad = _gelu_and_grad(gate, APPROX_TANH, True)
    dx_offsets = rows[:, None] * dx_row_stride + cols[None, :]
    dtype = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + dx_offsets, (grad * gelu).to(dtype), mask=mask)
    tl.store(dx_ptr + dx_offsets + hidden, (grad * value * gelu_grad).to(dtype), mask=mask)


def _tile(n_rows: int, hidden: int, target_elements: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a tile of about ``target_elements`` outputs."""
    block_n = min(triton.next_power_of_2(hidden), 2048)
    block_m = max(1, min(target_elements // block_n, triton.next_power_of_2(n_rows)))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return block_m, block_n, num_warps


def geglu_forward(x: torch.Tensor, approximate: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (contiguous, ``[..., H]``) lets tests pass a poisoned buffer; by default a new one."""
    hidden = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], hidden), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = as_rows(x)
    out_rows = out.view(-1, hidden)
    n_rows = rows.shape[0]
    block_m, block_n, num_warps = _tile(n_rows, hidden, elements_per_program(x.device))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(hidden, block_n))
    geglu_forward_kernel[grid](
        rows, out_rows, n_rows, hidden, rows.stride(0), out_rows.stride(0),
        APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return out


def geglu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, approximate: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    hidden = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if dx.numel() == 0:
        return dx
    rows = as_rows(x)
    grad_rows = as_rows(grad_out)
    dx_rows = dx.view(-1, 2 * hidden)
    n_rows = rows.shape[0]
    block_m, block_n, num_warps = _tile(n_rows, hidden, elements_per_program(x.device) // 2)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(hidden, block_n))
    geglu_backward_kernel[grid](
        grad_rows, rows, dx_rows, n_rows, hidden, grad_rows.stride(0), rows.stride(0), dx_rows.stride(0),
        APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dx
