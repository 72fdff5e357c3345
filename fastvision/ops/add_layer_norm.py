"""Fused residual add + LayerNorm: ``LayerNorm(x + residual)`` over the last dimension.

Backends: ``reference`` (below), ``cpu`` (csrc/cpu/add_layer_norm.cpp), ``triton``
(triton_kernels/add_layer_norm.py). The C++ ops ``fastvision::add_layer_norm_forward`` /
``add_layer_norm_backward`` are declared in csrc/add_layer_norm.cpp; the Triton launches are wrapped
here as ``fastvision::add_layer_norm_triton_forward`` / ``add_layer_norm_triton_backward``. Both pairs
get fake kernels and autograd, so torch.compile and torch.export see one opaque op.

The forward returns the output and the float32 per-row ``mean`` and ``rstd``; the backward
recomputes ``x + residual`` from the two inputs instead of reading a saved sum (the forward moves
three rows instead of four, a training step moves seven either way, and no extra activation is kept).
The gradients of ``x`` and ``residual`` are the same tensor, as for ``x + residual`` in autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision._backend import BackendUnavailableError, forced_backend, select_backend
from fastvision._extension import has_kernel
from fastvision.ops._checks import check_dtype, check_same_device, check_tensor

IMPLEMENTED_BACKENDS = ("reference", "cpu", "triton")
GPU_ORDER = ("triton",)
# Automatic choice on CPU tensors: the reference (ATen's add, then its vectorized layer_norm). The
# at::vec C++ kernel measured 0.7-0.75x of it at 256x1000 on a 2-core machine, where the custom-op
# call overhead is a large part of the time (bench/results/cpu-20261122/add_layer_norm_vectorized.txt),
# and within noise of it at larger sizes; it stays available by fastvision.use_backend("cpu").
CPU_ORDER: tuple[str, ...] = ()
# The Triton kernels keep a whole row in registers: MAX_DIM in triton_kernels/add_layer_norm.py.
TRITON_MAX_DIM = 65536


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The definition: LayerNorm of the sum over the last dimension."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d/dx == d/dresidual, d/dweight, d/dbias)`` in closed form, at least float32 math."""
    compute = torch.promote_types(x.dtype, torch.float32)
    summed = x.to(compute) + residual.to(compute)
    mean = summed.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(summed.var(dim=-1, unbiased=False, keepdim=True) + eps)
    x_hat = (summed - mean) * rstd
    grad = grad_out.to(compute)
    grad_hat = grad if weight is None else grad * weight.to(compute)
    dx = rstd * (
        grad_hat - grad_hat.mean(dim=-1, keepdim=True) - x_hat * (grad_hat * x_hat).mean(dim=-1, keepdim=True)
    )
    leading = tuple(range(x.dim() - 1))
    dweight = (grad * x_hat).sum(dim=leading)
    dbias = grad.sum(dim=leading)
    return dx.to(x.dtype), dweight, dbias


# --- Triton backend, wrapped as custom ops ------------------------------------------------------


@torch.library.custom_op("fastvision::add_layer_norm_triton_forward", mutates_args=())
def add_layer_norm_triton_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_forward

    return add_layer_norm_forward(x, residual, weight, bias, eps)


@torch.library.custom_op("fastvision::add_layer_norm_triton_backward", mutates_args=())
def add_layer_norm_triton_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_backward

    return add_layer_norm_backward(grad_out, x, residual, weight, bias, mean, rstd)


# --- fake kernels and autograd for both compiled backends -----------------------------------------


def _fake_forward(x, residual, weight, bias, eps):
    def stats():
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    return x.new_empty(x.shape), stats(), stats()


def _param_grad_like(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # A missing parameter gets an empty gradient: op outputs cannot be None.
    return x.new_empty((0,)) if param is None else param.new_empty(param.shape)


def _fake_backward(grad_out, x, residual, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _param_grad_like(weight, x), _param_grad_like(bias, x)


def _register(forward: str, backward: str) -> None:
    backward_op = getattr(torch.ops.fastvision, backward).default

    torch.library.register_fake(f"fastvision::{forward}")(_fake_forward)
    torch.library.register_fake(f"fastvision::{backward}")(_fake_backward)

    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, _eps = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward_fn(ctx, grad_out, _grad_mean, _grad_rstd):
        x, residual, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = backward_op(grad_out, x, residual, weight, bias, mean, rstd)
        return (
            dx,
            dx,
            None if weight is None else dweight,
            None if bias is None else dbias,
            None,
        )

    torch.library.register_autograd(f"fastvision::{forward}", backward_fn, setup_context=setup_context)


_register("add_layer_norm_triton_forward", "add_layer_norm_triton_backward")
CPP_OPS_BUILT = has_kernel("add_layer_norm_forward", "CPU")
if CPP_OPS_BUILT:
    _register("add_layer_norm_forward", "add_layer_norm_backward")


def _check_param(name: str, param: object, x: torch.Tensor) -> torch.Tensor | None:
    if param is None:
        return None
    check_tensor(name, param)
    if param.dim() != 1 or param.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must have shape [{x.shape[-1]}] (x's last dimension), got {list(param.shape)}"
        )
    if param.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"{name} must have x's dtype ({str(x.dtype).removeprefix('torch.')}) or float32, "
            f"got {str(param.dtype).removeprefix('torch.')}"
        )
    return param.contiguous()


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dimension, in one pass over the inputs.

    Args:
        x: ``[..., D]`` float32, float16 or bfloat16 tensor, any strides (math in float32).
        residual: same shape and device as ``x``; a different float dtype promotes both, as ``+`` does.
        weight: ``[D]`` scale, of ``x``'s dtype or float32, or ``None`` for none.
        bias: ``[D]`` shift, of ``x``'s dtype or float32, or ``None`` for none.
        eps: added to the variance before the reciprocal square root; must be positive.

    Returns:
        A new tensor of ``x``'s shape and of the promoted dtype; the inputs are never written.
    """
    check_tensor("x", x)
    check_tensor("residual", residual)
    check_dtype("x", x)
    check_dtype("residual", residual)
    if residual.dtype != x.dtype:
        # As eager `x + residual` would (autocast gives bf16 sublayer outputs beside fp32 streams).
        common = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(common), residual.to(common)
    if x.dim() == 0:
        raise ValueError(
            "x must have at least one dimension (the normalized last dimension), got a 0-d tensor"
        )
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    weight = _check_param("weight", weight, x)
    bias = _check_param("bias", bias, x)
    present = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    check_same_device(**{name: t for name, t in present.items() if t is not None})
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    eps = float(eps)

    backend = select_backend("add_layer_norm", x.device, IMPLEMENTED_BACKENDS, GPU_ORDER, CPU_ORDER)
    if backend == "triton" and x.shape[-1] > TRITON_MAX_DIM:
        if forced_backend() == "triton":
            raise BackendUnavailableError(
                f"add_layer_norm: the triton backend takes a last dimension up to {TRITON_MAX_DIM}, "
                f"got {x.shape[-1]}"
            )
        backend = "reference"
    if backend == "reference":
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    if backend == "triton":
        return torch.ops.fastvision.add_layer_norm_triton_forward(x, residual, weight, bias, eps)[0]
    return torch.ops.fastvision.add_layer_norm_forward(x, residual, weight, bias, eps)[0]
