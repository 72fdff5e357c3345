"""Fused GEGLU: ``x[..., 2H] -> x[..., :H] * gelu(x[..., H:])``.

Backends: ``reference`` (below), ``cpu`` (csrc/cpu/geglu.cpp), ``cuda`` (csrc/cuda/geglu.cu),
``triton`` (triton_kernels/geglu.py). The C++ ops ``fastvision::geglu_forward`` / ``geglu_backward``
are declared in csrc/geglu.cpp; the Triton launches are the ops ``fastvision::geglu_triton_forward``
/ ``geglu_triton_backward`` below. The op contract (``fastvision/ops/_contract.py``) registers fake
kernels and autograd for both pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision.ops._checks import check_choice, check_dtype, check_tensor
from fastvision.ops._contract import AutogradRule, KernelBackend, OpCost, OpSpec, define_op, triton_launch

APPROXIMATIONS = ("none", "tanh")
# Below this gate GELU and its derivative are 0 in float64 already (erfc underflows); clamping there
# keeps gelu(-inf) at its limit 0 instead of F.gelu's -inf * 0 = NaN, and leaves every other value.
GATE_FLOOR = -1e4
# Above this gate GELU is the identity and its derivative exactly 1 in float32 and float64 (both
# forms); taking those limits there keeps gate**3, gate**2 and gate * (1 - t*t) (and F.gelu's own
# gradient) finite instead of inf * 0 = NaN at huge or infinite gates, and leaves every value.
GATE_CEIL = 50.0


def geglu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The definition: split the last dim into value and gate, return ``value * gelu(gate)``
    (``gelu(-inf) = 0``, ``gelu(g) = g`` past ``GATE_CEIL``: the limits, with finite gradients)."""
    value, gate = x.chunk(2, dim=-1)
    gelu = F.gelu(gate.clamp(GATE_FLOOR, GATE_CEIL), approximate=approximate)
    return value * torch.where(gate > GATE_CEIL, gate, gelu)


def geglu_backward_reference(
    grad_out: torch.Tensor, x: torch.Tensor, approximate: str = "none"
) -> torch.Tensor:
    """d(geglu)/dx in closed form, at least float32 math: the backward ops' oracle and, being plain
    differentiable PyTorch, their rule for higher-order gradients."""
    compute = torch.promote_types(x.dtype, torch.float32)
    value, gate = x.to(compute).chunk(2, dim=-1)
    gate = gate.clamp_min(GATE_FLOOR)  # the limits at -inf: gelu 0, derivative 0 (not -inf * 0)
    grad = grad_out.to(compute)
    dgate = gate.clamp_max(GATE_CEIL)  # the derivative's limit 1 at +inf (not inf * 0)
    if approximate == "tanh":
        k = (2.0 / torch.pi) ** 0.5
        t = torch.tanh(k * (gate + 0.044715 * gate**3))
        gelu = 0.5 * gate * (1 + t)
        td = torch.tanh(k * (dgate + 0.044715 * dgate**3))
        dgelu = 0.5 * (1 + td) + 0.5 * dgate * (1 - td * td) * k * (1 + 3 * 0.044715 * dgate**2)
    else:
        cdf = 0.5 * (1 + torch.erf(gate * 0.5**0.5))
        gelu = gate * cdf
        dcdf = 0.5 * (1 + torch.erf(dgate * 0.5**0.5))
        dgelu = dcdf + dgate * torch.exp(-0.5 * dgate * dgate) / (2 * torch.pi) ** 0.5
    return torch.cat([grad * gelu, grad * value * dgelu], dim=-1).to(x.dtype)


@triton_launch("geglu_triton_forward")
def geglu_triton_forward(x: torch.Tensor, approximate: str) -> torch.Tensor:
    from fastvision.triton_kernels.geglu import geglu_forward

    return geglu_forward(x, approximate)


@triton_launch("geglu_triton_backward")
def geglu_triton_backward(grad_out: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    from fastvision.triton_kernels.geglu import geglu_backward

    return geglu_backward(grad_out, x, approximate)


def _check_forward_op(x: torch.Tensor, approximate: str) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them: the public checks."""
    _check(x, approximate)


def _check_backward_op(grad_out: torch.Tensor, x: torch.Tensor, approximate: str) -> None:
    """The backward op's own arguments: the forward's, and grad_out of the output's shape."""
    _check(x, approximate)
    check_tensor("grad_out", grad_out)
    expected = (*x.shape[:-1], x.shape[-1] // 2)
    if tuple(grad_out.shape) != expected or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be {x.dtype} of shape {list(expected)} on {x.device} (the output's), got "
            f"{grad_out.dtype} {list(grad_out.shape)} on {grad_out.device}"
        )


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, backward_op, grad_out):
    (x,) = ctx.saved_tensors
    return backward_op(grad_out, x, ctx.approximate), None


AUTOGRAD = AutogradRule(
    forward_fake=lambda x, approximate: x.new_empty((*x.shape[:-1], x.shape[-1] // 2)),
    backward_fake=lambda grad_out, x, approximate: x.new_empty(x.shape),
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=geglu_backward_reference,
    backward_differentiable=(0, 1),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


def geglu_onnx():
    """geglu in standard ONNX operators (onnxscript), for ``torch.onnx.export``."""
    from onnxscript import opset18 as op

    def geglu(x, approximate: str = "none"):
        value, gate = op.Split(x, axis=-1, num_outputs=2)
        if approximate == "tanh":
            cubic = op.Mul(op.CastLike(0.044715, gate), op.Mul(gate, op.Mul(gate, gate)))
            inner = op.Mul(op.CastLike(0.7978845608028654, gate), op.Add(gate, cubic))
            phi = op.Mul(op.CastLike(0.5, gate), op.Add(op.CastLike(1.0, gate), op.Tanh(inner)))
        else:
            erf = op.Erf(op.Mul(gate, op.CastLike(0.7071067811865476, gate)))
            phi = op.Mul(op.CastLike(0.5, gate), op.Add(op.CastLike(1.0, gate), erf))
        return op.Mul(value, op.Mul(gate, phi))

    return geglu


def _check(x: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, str]:
    check_tensor("x", x)
    check_choice("approximate", approximate, APPROXIMATIONS)
    check_dtype("x", x)
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        last = "a 0-d tensor" if x.dim() == 0 else f"last dimension {x.shape[-1]}"
        raise ValueError(f"x must have an even last dimension (value and gate halves), got {last}")
    return x, approximate


def _cost(x: torch.Tensor, approximate: str) -> OpCost:
    """Read x (2N elements), write N; per output GELU (erf form 5 FLOPs, tanh form 9) and the product."""
    outputs = x.numel() // 2
    return OpCost(3 * outputs * x.element_size(), (10 if approximate == "tanh" else 6) * outputs)


_native = KernelBackend("geglu_forward", "geglu_backward", AUTOGRAD, native=True, onnx=geglu_onnx)
GEGLU = define_op(
    OpSpec(
        name="geglu",
        cost=_cost,
        reference=geglu_reference,
        check=_check,
        device=lambda x, approximate: x.device,
        kernels={
            "cpu": _native,
            "cuda": _native,
            "triton": KernelBackend(
                "geglu_triton_forward", "geglu_triton_backward", AUTOGRAD, onnx=geglu_onnx
            ),
        },
        # Expected fastest first: the CUDA kernel moves 16-byte vectors per thread. To be confirmed by
        # the GPU pass (bench/gpu_pass.sh); reorder when its results say otherwise.
        gpu_order=("cuda", "triton"),
        cpu_order=("cpu",),
        triton_module="fastvision.triton_kernels.geglu",
        benchmark_module="fastvision.benchmark.geglu",
    )
)


def geglu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GEGLU over the last dimension: ``x[..., :H] * gelu(x[..., H:])`` with ``H = x.shape[-1] // 2``.

    Args:
        x: ``[..., 2H]`` float32, float16 or bfloat16 tensor, any strides (math in float32).
        approximate: ``"none"`` for exact (erf) GELU, ``"tanh"`` for the tanh approximation.

    Returns:
        A new ``[..., H]`` tensor of ``x``'s dtype; ``x`` is never written.
    """
    return GEGLU(x, approximate)
