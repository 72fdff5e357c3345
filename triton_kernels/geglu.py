"""GEGLU forward and backward in Triton.

The input is viewed as rows ``[M, 2H]`` (unit stride along the last dim, any row stride); each
program handles a ``BLOCK_M x BLOCK_N`` tile of the output so loads along a row stay contiguous
and vectorize. Math in float32; storage in the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

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

# Programs on grid axis 0 (CUDA's limit); the grid has no other axis.
MAX_PROGRAMS = 2**31 - 1
# Output elements per program: on a GPU, and in the interpreter (which amortizes its per-program cost).
GPU_ELEMENTS = 4096
_INTERPRETER_ELEMENTS = 65536
MIN_BLOCK_N = 16
MAX_BLOCK_N = 2048
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# sm_90: nothing spills at any configuration these launchers choose (checked by compiling
# launch_configs()).
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {}


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    # Literals, not module globals: compiled @triton.jit code cannot read non-constexpr globals.
    SQRT_HALF = 0.7071067811865476  # 1/sqrt(2)
    INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2*pi)
    SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi)
    TANH_CUBIC = 0.044715
    # exp through exp2 with the scales folded into the argument's polynomial: one multiply-add and
    # one MUFU.EX2 (tl.exp lowers to a scale, ex2.approx and range fix-ups).
    NEG_2_LOG2E_K = -2.302208198144325  # -2 * log2(e) * sqrt(2/pi)
    NEG_HALF_LOG2E = -0.7213475204444817  # -0.5 * log2(e)
    if APPROX_TANH:
        # 0.5 * (1 + tanh(u)) = sigmoid(2u) = s and 1 - s = sigmoid(-2u) = 1 / (1 + 1/e), e = exp(-2u):
        # neither 1 + tanh(u) nor 1 - tanh^2 is formed, so nothing cancels where tanh(u) is near -1 or
        # 1. e is not clamped: it reaches inf for very negative gates (u is -inf once g^2 overflows),
        # where s is 0 and 1 - s is 1, the exact limits.
        e = tl.math.exp2(g * (NEG_2_LOG2E_K + (NEG_2_LOG2E_K * TANH_CUBIC) * (g * g)))  # exp(-2u)
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
            pdf = tl.math.exp2(NEG_HALF_LOG2E * (g * g))  # exp(-g^2 / 2)
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
    # One-axis grid: row block p // col_blocks, column block p % col_blocks.
    # int64 rows: M * 2H can pass 2**31 (and so can M with a tiny H).
    col_blocks = tl.cdiv(hidden, BLOCK_N)
    rows = (tl.program_id(0) // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    col_blocks = tl.cdiv(hidden, BLOCK_N)
    rows = (tl.program_id(0) // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
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


def block_width(hidden: int) -> int:
    """BLOCK_N for rows of ``hidden`` outputs: the widest power of two in [MIN_BLOCK_N, MAX_BLOCK_N]
    whose column blocks pad the row within 1/16 of the least padding any width gives, so a row that
    is not a power of two is cut into equal blocks rather than rounded up: H = 3072 runs as 3 x 1024
    columns with no idle lane (one 2048-wide block and a half-idle one leave a quarter of the lanes
    idle), H = 768 as 3 x 256, H = 1000 as one 1024-wide block (2% idle)."""
    widths = []
    width = MIN_BLOCK_N
    while width <= MAX_BLOCK_N:
        widths.append((width, triton.cdiv(hidden, width) * width))
        width *= 2
    least = min(padded for _, padded in widths)
    return max(width for width, padded in widths if 16 * padded <= 17 * least)


def tile(
    hidden: int, backward: bool, n_rows: int | None = None, interpret: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a tile of about ``GPU_ELEMENTS`` outputs (half of that for the
    backward, which moves twice the values) and ``block_width(hidden)`` columns. On a GPU it depends
    on ``hidden`` only; the interpreter takes larger tiles, up to ``n_rows`` rows."""
    target = (_INTERPRETER_ELEMENTS if interpret else GPU_ELEMENTS) // (2 if backward else 1)
    block_n = block_width(hidden)
    block_m = max(1, target // block_n)
    if interpret:
        block_m = min(block_m, triton.next_power_of_2(max(n_rows or 1, 1)))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return block_m, block_n, num_warps


def geglu_grid(n_rows: int, hidden: int, backward: bool = False, interpret: bool = False) -> tuple[int]:
    """Launch grid of the forward (or backward) kernel: row blocks x column blocks on axis 0."""
    block_m, block_n, _ = tile(hidden, backward, n_rows, interpret)
    programs = triton.cdiv(n_rows, block_m) * triton.cdiv(hidden, block_n)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"geglu: {programs} programs exceed the grid limit {MAX_PROGRAMS}")
    return (programs,)


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and interpreting()


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
    interpret = _interpret(x)
    block_m, block_n, num_warps = tile(hidden, False, n_rows, interpret)
    geglu_forward_kernel[geglu_grid(n_rows, hidden, False, interpret)](
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
    interpret = _interpret(x)
    block_m, block_n, num_warps = tile(hidden, True, n_rows, interpret)
    geglu_backward_kernel[geglu_grid(n_rows, hidden, True, interpret)](
        grad_rows, rows, dx_rows, n_rows, hidden, grad_rows.stride(0), rows.stride(0), dx_rows.stride(0),
        APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dx


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps) the launchers can choose on a GPU: each dtype, both
    GELU forms, and the tile of one hidden size per tile class (from ``tile``)."""
    for name in _DTYPES.values():
        data = f"*{name}"
        pointers = {"x_ptr": data, "out_ptr": data, "grad_ptr": data, "dx_ptr": data}
        for kernel, backward in ((geglu_forward_kernel, False), (geglu_backward_kernel, True)):
            hidden = MIN_BLOCK_N
            while hidden <= MAX_BLOCK_N:
                block_m, block_n, num_warps = tile(hidden, backward)
                for tanh in (False, True):
                    constexprs = {"APPROX_TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}
                    yield KernelLaunch(
                        kernel,
                        kernel_signature(kernel, constexprs, pointers),
                        constexprs,
                        num_warps,
                        label=f"{'backward' if backward else 'forward'} {name} {block_n}-column blocks"
                        + (" tanh" if tanh else ""),
                        tags={"dtype": name, "hidden": hidden, "approximate": "tanh" if tanh else "none"},
                    )
                hidden *= 2


def _contiguous_launch(constexprs: dict) -> dict[str, int]:
    """Argument values of a launch on contiguous tensors from torch's allocator, on which Triton
    specializes (bench/kernel_budget.py compiles what such a launch compiles): pointers 16-byte
    aligned, ``H`` a whole number of the tile's column blocks (3 x BLOCK_N: 3072 for 1024-wide blocks;
    a multiple of 16, as every benchmark size is) and row strides of 2H (x, dx) and H (out, grad).
    ``n_rows`` is left general. A row length that is not a multiple of 16 compiles narrower loads."""
    hidden = 3 * constexprs["BLOCK_N"]
    values = {"x_ptr": 16, "out_ptr": 16, "grad_ptr": 16, "dx_ptr": 16, "hidden": hidden}
    values.update({"x_row_stride": 2 * hidden, "dx_row_stride": 2 * hidden})
    values.update({"out_row_stride": hidden, "grad_row_stride": hidden})
    return values


LAUNCH_SPECIALIZATION = {
    kernel.fn.__name__: _contiguous_launch for kernel in (geglu_forward_kernel, geglu_backward_kernel)
}
