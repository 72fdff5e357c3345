"""Fused residual add + LayerNorm: ``LayerNorm(x + residual)`` over the last dimension.

Backends: ``reference`` (below), ``cpu`` (csrc/cpu/add_layer_norm.cpp), ``triton``
(triton_kernels/add_layer_norm.py). The C++ ops ``fastvision::add_layer_norm_forward`` /
``add_layer_norm_backward`` are declared in csrc/add_layer_norm.cpp; the Triton launches are the ops
``fastvision::add_layer_norm_triton_forward`` / ``add_layer_norm_triton_backward`` below. The op
contract (``fastvision/ops/_contract.py``) registers fake kernels and autograd for both pairs.

The forward ops return the output, the float32 per-row ``mean`` and ``rstd``, and the sum
``x + residual`` in x's dtype when ``return_residual`` is set (an empty ``[0]`` tensor otherwise): a
pre-norm block (``h = h + f(norm(h))``) takes the sum from the same pass instead of adding again. The
backward recomputes ``x + residual`` from the two inputs instead of reading a saved sum (the forward
moves three rows instead of four, a training step moves seven either way, and no extra activation is
kept) and adds the sum's gradient, when there is one, into ``dx``. The gradients of ``x`` and
``residual`` are the same tensor, as for ``x + residual`` in autograd.

Statistics are computed stably in every backend: the variance from mean-centred values (a row of
equal values normalizes to exactly 0), and rows whose magnitude would overflow float32 squares
(past about 1.8e19) are first scaled by an exact power of two, with ``eps`` scaled to match (the
kernels scale by the largest deviation instead, and form sums and differences of halves, so that rows
up to the float32 maximum give the reference's result rather than an overflow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

# Longest row the Triton kernels take: MAX_DIM in triton_kernels/add_layer_norm.py.
TRITON_MAX_DIM = 65536
# Rows whose largest magnitude passes this are scaled by a power of two before their statistics:
# float32 squares overflow past about 1.8e19.
_SCALE_ABOVE = 2.0**60


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The definition: LayerNorm of the sum over the last dimension, ``(s - mean) / sqrt(var + eps)``;
    with ``return_residual`` the pair ``(out, s)``, ``s = x + residual`` in x's dtype.

    Computed as ``F.layer_norm`` would be, with one safeguard it lacks: a row whose magnitude would
    overflow the squares of its dtype is divided by an exact power of two first (``eps`` scaled by
    its square), which leaves the result unchanged where nothing overflows.
    """
    summed = x + residual
    out = _normalize(summed, weight, bias, eps)
    return (out, summed) if return_residual else out


def _normalize(summed, weight, bias, eps):
    if summed.numel() == 0:
        return F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps)
    compute = torch.promote_types(summed.dtype, torch.float32)
    values = summed.to(compute).contiguous()
    largest = values.detach().abs().amax(dim=-1, keepdim=True)
    exponent = torch.frexp(largest).exponent
    shift = torch.where(largest > _SCALE_ABOVE, exponent, torch.zeros_like(exponent))
    values = torch.ldexp(values, -shift.to(compute))
    row_eps = torch.ldexp(torch.full_like(largest, eps), -2.0 * shift.to(compute))
    row_eps = row_eps.clamp_min(torch.finfo(compute).tiny)
    var, mean = torch.var_mean(values, dim=-1, unbiased=False, keepdim=True)
    out = (values - mean) * torch.rsqrt(var + row_eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(summed.dtype)


def add_layer_norm_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d/dx == d/dresidual, d/dweight, d/dbias)`` in closed form, at least float32 math (of the
    normalized output alone: a gradient of the returned sum adds to ``d/dx`` unchanged)."""
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


@triton_launch("add_layer_norm_triton_forward")
def add_layer_norm_triton_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    return_residual: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_forward

    return add_layer_norm_forward(x, residual, weight, bias, eps, return_residual=return_residual)


@triton_launch("add_layer_norm_triton_backward")
def add_layer_norm_triton_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_summed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.add_layer_norm import add_layer_norm_backward

    return add_layer_norm_backward(grad_out, x, residual, weight, bias, mean, rstd, grad_summed=grad_summed)


def _check_op_inputs(x, residual, weight, bias, eps=1e-5, return_residual=False) -> None:
    """The public checks for a direct call of a Triton op, and what the public op hands it already
    prepared: residual in x's dtype, contiguous weight and bias (the kernels read them at unit
    stride), a last dimension the kernels take."""
    _check(x, residual, weight, bias, eps, return_residual)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype} (the op promotes), got {residual.dtype}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and not param.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {list(param.stride())}")
    reason = _triton_supports(x, residual, weight, bias, eps, return_residual)
    if reason is not None:
        raise ValueError(reason)


def _check_forward_op(x, residual, weight, bias, eps, return_residual=False) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them."""
    _check_op_inputs(x, residual, weight, bias, eps, return_residual)


def _check_backward_op(grad_out, x, residual, weight, bias, mean, rstd, grad_summed) -> None:
    """The backward op's own arguments: the forward's, the gradients and the saved statistics."""
    _check_op_inputs(x, residual, weight, bias)
    _check_backward_tensors(x, grad_out, grad_summed, mean, rstd)


def _check_backward_tensors(x, grad_out, grad_summed, mean, rstd) -> None:
    """The backward ops' extra inputs: gradients of x's shape and dtype, float32 statistics per row."""
    for name, grad in (("grad_out", grad_out), ("grad_summed", grad_summed)):
        if grad is None and name == "grad_summed":
            continue
        check_tensor(name, grad)
        if grad.shape != x.shape or grad.dtype != x.dtype:
            raise ValueError(
                f"{name} must have x's shape {list(x.shape)} and dtype {x.dtype}, got "
                f"{list(grad.shape)} and {grad.dtype}"
            )
    for name, stat in (("mean", mean), ("rstd", rstd)):
        check_tensor(name, stat)
        if stat.dtype != torch.float32 or stat.shape != x.shape[:-1]:
            raise ValueError(
                f"{name} must be float32 of shape {list(x.shape[:-1])} (one value per row), got "
                f"{stat.dtype} {list(stat.shape)}"
            )
    present = {"x": x, "grad_out": grad_out, "mean": mean, "rstd": rstd}
    if grad_summed is not None:
        present["grad_summed"] = grad_summed
    check_same_device(**present)


# --- fake kernels and autograd for both compiled backends -----------------------------------------


def _fake_forward(x, residual, weight, bias, eps, return_residual=False):
    def stats():
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    summed = x.new_empty(x.shape) if return_residual else x.new_empty((0,))
    return x.new_empty(x.shape), stats(), stats(), summed


def _param_grad_like(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # A missing parameter gets an empty gradient: op outputs cannot be None.
    return x.new_empty((0,)) if param is None else param.new_empty(param.shape)


def _fake_backward(grad_out, x, residual, weight, bias, mean, rstd, grad_summed):
    return x.new_empty(x.shape), _param_grad_like(weight, x), _param_grad_like(bias, x)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, *rest = inputs
    _out, mean, rstd, _summed = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.return_residual = bool(rest and rest[0])


def _backward(ctx, backward_op, grad_out, _grad_mean, _grad_rstd, grad_summed):
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if not ctx.return_residual:
        grad_summed = None
    dx, dweight, dbias = backward_op(grad_out, x, residual, weight, bias, mean, rstd, grad_summed)
    return dx, dx, None if weight is None else dweight, None if bias is None else dbias, None, None


def _backward_op_reference(grad_out, x, residual, weight, bias, mean, rstd, grad_summed):
    """The backward ops' definition, differentiable in every input (the higher-order rule).

    ``eps`` is not an input of the backward ops; ``rstd = (var + eps)^-1/2`` carries it. The sum's
    gradient ``grad_summed`` (``None``: no gradient) adds to ``d/dx``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.enable_grad():
        summed = leaf(x.to(compute) + residual.to(compute))
        scale = None if weight is None else leaf(weight.to(compute))
        var, mean = torch.var_mean(summed, dim=-1, unbiased=False, keepdim=True)
        # The eps that makes (var + eps)^-1/2 equal the saved rstd: a constant, so that rstd is an
        # exact function of var to every order.
        eps = rstd.to(compute).unsqueeze(-1).pow(-2) - var.detach()
        out = (summed - mean) * torch.rsqrt(var + eps)
        if scale is not None:
            out = out * scale
        inputs = [summed] if scale is None else [summed, scale]
        grads = torch.autograd.grad(out, inputs, grad_out.to(compute), create_graph=True)
    leading = tuple(range(x.dim() - 1))
    dweight = grads[1] if weight is not None else x.new_empty((0,))
    dbias = grad_out.to(compute).sum(dim=leading) if bias is not None else x.new_empty((0,))
    dx = grads[0] if grad_summed is None else grads[0] + grad_summed.to(compute)
    return dx.to(x.dtype), dweight, dbias


AUTOGRAD = AutogradRule(
    forward_fake=_fake_forward,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_backward_op_reference,
    backward_differentiable=(0, 1, 2, 3, 7),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


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


def _check(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    return_residual: bool = False,
) -> tuple:
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
    if not isinstance(return_residual, bool):
        raise TypeError(f"return_residual must be a bool, got {type(return_residual).__name__}")
    return x, residual, weight, bias, float(eps), return_residual


def add_layer_norm_onnx():
    """The forward ops ``(out, mean, rstd, summed)`` in standard ONNX operators (onnxscript);
    ``summed`` is an empty ``[0]`` tensor unless ``return_residual``."""
    from onnxscript import opset18 as op

    def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5, return_residual: bool = False):
        summed = op.Add(x, residual)
        if weight is None:  # LayerNormalization needs a scale
            weight = op.Expand(op.CastLike(1.0, summed), op.Shape(summed, start=-1))
        out, mean, rstd = op.LayerNormalization(summed, weight, bias, axis=-1, epsilon=eps, stash_type=1)
        # The ops' sum, or their empty [0] placeholder.
        returned = op.Identity(summed) if return_residual else op.Slice(op.Reshape(summed, [-1]), [0], [0])
        return out, op.Squeeze(mean, [-1]), op.Squeeze(rstd, [-1]), returned

    return add_layer_norm


def _triton_supports(x, residual, weight, bias, eps=1e-5, return_residual=False):
    if x.shape[-1] > TRITON_MAX_DIM:
        return f"the triton backend takes a last dimension up to {TRITON_MAX_DIM}, got {x.shape[-1]}"
    return None


def _cost(x, residual, weight, bias, eps, return_residual=False) -> OpCost:
    """Read x and residual, write out ([M, D], and the sum with return_residual) and float32 mean and
    rstd ([M]), read weight/bias ([D]); 6 FLOPs per element (add, sum, subtract, square, sum, scale)
    plus 1 each for weight, bias."""
    elements, rows = x.numel(), x.numel() // max(x.shape[-1], 1)
    params = [p for p in (weight, bias) if p is not None]
    rows_moved = 4 if return_residual else 3
    moved = rows_moved * elements * x.element_size() + 8 * rows
    moved += sum(p.numel() * p.element_size() for p in params)
    return OpCost(moved, (6 + len(params)) * elements)


def _public_result(forward_op, *args):
    out, _mean, _rstd, summed = forward_op(*args)
    return (out, summed) if args[-1] else out


ADD_LAYER_NORM = define_op(
    OpSpec(
        name="add_layer_norm",
        cost=_cost,
        reference=add_layer_norm_reference,
        check=_check,
        device=lambda x, *_: x.device,
        kernels={
            "cpu": KernelBackend(
                "add_layer_norm_forward", "add_layer_norm_backward", AUTOGRAD, native=True,
                call=_public_result, onnx=add_layer_norm_onnx,
            ),
            "triton": KernelBackend(
                "add_layer_norm_triton_forward", "add_layer_norm_triton_backward", AUTOGRAD,
                supports=_triton_supports, call=_public_result, onnx=add_layer_norm_onnx,
            ),
        },
        gpu_order=("triton",),
        # The C++ kernel on CPU tensors: measured 21x (forward) and 9.6x (forward + backward) the
        # reference at 256x1000 and 26x / 8.5x at 1024x1000, float32, one thread, side by side in one
        # run on the 2-core development machine (loaded; the reference is many ATen passes since its
        # overflow safeguard: frexp, ldexp, amax, var_mean). fastvision.use_backend("reference") runs it.
        cpu_order=("cpu",),
        triton_module="fastvision.triton_kernels.add_layer_norm",
        benchmark_module="fastvision.benchmark.add_layer_norm",
    )
)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(x + residual)`` over the last dimension, in one pass over the inputs.

    Args:
        x: ``[..., D]`` float32, float16 or bfloat16 tensor, any strides (math in float32).
        residual: same shape and device as ``x``; a different float dtype promotes both, as ``+`` does.
        weight: ``[D]`` scale, of ``x``'s dtype or float32, or ``None`` for none.
        bias: ``[D]`` shift, of ``x``'s dtype or float32, or ``None`` for none.
        eps: added to the variance before the reciprocal square root; must be positive.
        return_residual: also return ``x + residual`` (the pre-norm residual stream), formed in the
            same pass; its gradient flows to ``x`` and ``residual``.

    Returns:
        A new tensor of ``x``'s shape and of the promoted dtype; with ``return_residual`` the pair
        ``(out, x + residual)``, the sum in that dtype. The inputs are never written.
    """
    return ADD_LAYER_NORM(x, residual, weight, bias, eps, return_residual)
