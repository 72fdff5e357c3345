"""Global Response Normalization (ConvNeXt V2) on channels-last ``x [B, H, W, C]``.

``Gx[b, c] = sqrt(sum over unmasked (h, w) of x[b, h, w, c]^2)``, ``Nx = Gx / (mean over c of Gx + eps)``,
``out = gamma * (x * Nx) + beta + x``. With ``mask [B, H, W]`` (True = masked) masked sites do not
contribute to ``Gx``; the formula still applies at every site.

Backward, with ``g`` the output gradient and ``S[b, c] = sum over (h, w) of g * x``:
``dNx = gamma * S``, ``dGx = dNx / (D + eps) - mean over c of (dNx * Gx) / (D + eps)^2`` with
``D = mean over c of Gx``, and ``dx = g * (gamma * Nx + 1) + dGx * x * keep / Gx`` (0 where
``Gx = 0``); ``dgamma = sum g * x * Nx``, ``dbeta = sum g``.

Backends: ``reference`` (below), ``cpu`` (csrc/cpu/grn.cpp: threads over blocks of 64 sites, per-block
partial sums added in block order, then an apply pass; bit-identical for any thread count) and
``triton`` (triton_kernels/grn.py: one program per sample that
reduces and then applies from L2 where the sample fits, else per-chunk partial sums summed in a fixed
order and an apply pass; forward and backward, no float atomics, bit-identical run to run; the
backward recomputes ``Gx`` rather than keeping it). Math in float32. The kernel ops take an empty
``mask`` for "no mask" (op inputs cannot be None).
"""

from __future__ import annotations

import math

import torch

from fastvision.ops._checks import check_dtype, check_same_device, check_tensor
from fastvision.ops._contract import (
    AutogradRule,
    KernelBackend,
    OpCost,
    OpSpec,
    define_op,
    leaf,
    triton_launch,
)


def grn_reference(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition, in float32 math (ConvNeXt V2's GRN, told the mask)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    values = x.to(compute)
    # A masked site is left out, not multiplied by 0: a NaN or inf there must not reach Gx.
    kept = values if mask is None else values.masked_fill(mask.unsqueeze(-1), 0.0)
    sum_sq = kept.square().sum(dim=(1, 2), keepdim=True)
    # sqrt with the derivative 0 at 0 (an all-zero channel has Gx = 0 and no gradient through it;
    # sqrt's own derivative there is inf, and inf * 0 is NaN).
    positive = sum_sq > 0
    gx = torch.where(positive, torch.where(positive, sum_sq, 1.0).sqrt(), 0.0)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    out = gamma.to(compute) * (values * nx) + beta.to(compute) + values
    return out.to(x.dtype)


def _grn_backward_reference(grad_out, x, gamma, beta, mask, eps):
    """The backward ops' definition by autograd of the reference (differentiable: the higher-order rule)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.enable_grad():
        inputs = [leaf(t.to(compute)) for t in (x, gamma, beta)]
        out = grn_reference(*inputs, eps, None if mask.numel() == 0 else mask)
        dx, dgamma, dbeta = torch.autograd.grad(out, inputs, grad_out.to(compute), create_graph=True)
    return dx.to(x.dtype), dgamma, dbeta


@triton_launch("grn_triton_forward")
def grn_triton_forward(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor, eps: float
) -> torch.Tensor:
    from fastvision.triton_kernels.grn import grn_forward

    return grn_forward(x, gamma, beta, mask, eps)


@triton_launch("grn_triton_backward")
def grn_triton_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.grn import grn_backward

    return grn_backward(grad_out, x, gamma, beta, mask, eps)


def _check_forward_op(x, gamma, beta, mask, eps) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them: the public checks
    (an empty ``mask`` means none)."""
    check_tensor("mask", mask)
    _check(x, gamma, beta, eps, None if mask.numel() == 0 and mask.dim() == 1 else mask)
    for name, param in (("gamma", gamma), ("beta", beta)):
        if param.dim() != 1:  # the public op passes them reshaped to [C]; the kernels read them so
            raise ValueError(f"{name} must have shape [{x.shape[3]}] (x's channels), got {list(param.shape)}")


def _check_backward_op(grad_out, x, gamma, beta, mask, eps) -> None:
    """The backward op's own arguments: the forward's, and grad_out of x's shape, dtype and device."""
    _check_forward_op(x, gamma, beta, mask, eps)
    check_tensor("grad_out", grad_out)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be {x.dtype} of x's shape {list(x.shape)} on {x.device}, got "
            f"{grad_out.dtype} {list(grad_out.shape)} on {grad_out.device}"
        )


def _forward_fake(x, gamma, beta, mask, eps):
    return x.new_empty(x.shape)


def _backward_fake(grad_out, x, gamma, beta, mask, eps):
    return x.new_empty(x.shape), gamma.new_empty(gamma.shape, dtype=torch.float32), gamma.new_empty(
        gamma.shape, dtype=torch.float32
    )


def _setup_context(ctx, inputs, output):
    x, gamma, beta, mask, eps = inputs
    ctx.save_for_backward(x, gamma, beta, mask)
    ctx.eps = eps


def _backward(ctx, backward_op, grad_out):
    x, gamma, beta, mask = ctx.saved_tensors
    dx, dgamma, dbeta = backward_op(grad_out.contiguous(), x, gamma, beta, mask, ctx.eps)
    return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_grn_backward_reference,
    backward_differentiable=(0, 1, 2, 3),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


def _check(x, gamma, beta, eps=1e-6, mask=None) -> tuple:
    check_tensor("x", x)
    check_tensor("gamma", gamma)
    check_tensor("beta", beta)
    check_dtype("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last [B, H, W, C], got shape {list(x.shape)}")
    channels = x.shape[3]
    for name, param in (("gamma", gamma), ("beta", beta)):
        if param.shape != (channels,) and param.numel() != channels:
            raise ValueError(f"{name} must have shape [{channels}] (x's channels), got {list(param.shape)}")
        if param.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype or float32, got {param.dtype}")
    gamma, beta = gamma.reshape(channels), beta.reshape(channels)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = masked), got {mask.dtype}")
        if list(mask.shape) != list(x.shape[:3]):
            raise ValueError(f"mask must have shape [B, H, W] = {list(x.shape[:3])}, got {list(mask.shape)}")
        check_same_device(x=x, gamma=gamma, beta=beta, mask=mask)
    else:
        check_same_device(x=x, gamma=gamma, beta=beta)
    return x, gamma, beta, float(eps), mask


def _run_kernel(forward_op, x, gamma, beta, eps, mask):
    if mask is None:
        mask = x.new_empty((0,), dtype=torch.bool)  # op inputs cannot be None: empty means no mask
    return forward_op(x, gamma, beta, mask, eps)


def _cost(x, gamma, beta, eps, mask) -> OpCost:
    """Read x once and write out once (2 N e: the least DRAM traffic; the statistics walk's reads come back
    from L2 in the one-pass kernel; the [C] parameters and the mask are not counted); 6 FLOPs per element
    (square, sum, scale, gamma, beta, residual), 7 with the mask."""
    return OpCost(2 * x.numel() * x.element_size(), (6 if mask is None else 7) * x.numel())


GRN = define_op(
    OpSpec(
        name="grn",
        cost=_cost,
        reference=grn_reference,
        check=_check,
        device=lambda x, *_: x.device,
        kernels={
            "cpu": KernelBackend("grn_forward", "grn_backward", AUTOGRAD, native=True, call=_run_kernel),
            "triton": KernelBackend("grn_triton_forward", "grn_triton_backward", AUTOGRAD, call=_run_kernel),
        },
        gpu_order=("triton",),
        cpu_order=("cpu",),
        triton_module="fastvision.triton_kernels.grn",
        benchmark_module="fastvision.benchmark.grn",
    )
)


def grn(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global Response Normalization of channels-last ``x`` (see the module docstring).

    Args:
        x: ``[B, H, W, C]`` float32, float16 or bfloat16, any strides.
        gamma, beta: ``[C]`` (or any shape of ``C`` elements, such as ConvNeXt V2's ``[1, 1, 1, C]``),
            of ``x``'s dtype or float32.
        eps: added to the mean response; positive.
        mask: optional ``[B, H, W]`` bool, True where a site is masked (left out of ``Gx``).

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    return GRN(x, gamma, beta, eps, mask)
