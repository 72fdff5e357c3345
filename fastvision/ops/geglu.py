"""Fused GEGLU: ``x[..., 2H] -> x[..., :H] * gelu(x[..., H:])``.

Backends: ``reference`` (below), ``cpu`` (csrc/cpu/geglu.cpp), ``cuda`` (csrc/cuda/geglu.cu),
``triton`` (triton_kernels/geglu.py). The C++ ops ``fastvision::geglu_forward`` /
``geglu_backward`` are declared in csrc/fastvision.cpp; the Triton launches are wrapped here as
``fastvision::geglu_triton_forward`` / ``geglu_triton_backward``. Both pairs get fake kernels and
autograd, so torch.compile and torch.export see one opaque op with no graph break.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision._backend import select_backend
from fastvision._extension import has_kernel
from fastvision.ops._checks import check_choice, check_dtype, check_tensor

APPROXIMATIONS = ("none", "tanh")
IMPLEMENTED_BACKENDS = ("reference", "cpu", "triton", "cuda")
# Expected fastest first: the CUDA kernel moves 16-byte vectors per thread. To be confirmed by the GPU
# pass (bench/gpu_pass.sh); reorder when its results say otherwise.
GPU_ORDER = ("cuda", "triton")


def geglu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The definition: split the last dim into value and gate, return ``value * gelu(gate)``."""
    value, gate = x.chunk(2, dim=-1)
    return value * F.gelu(gate, approximate=approximate)


def geglu_backward_reference(
    grad_out: torch.Tensor, x: torch.Tensor, approximate: str = "none"
) -> torch.Tensor:
    """d(geglu)/dx in closed form, at least float32 math (tests check the backward kernels with it)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    value, gate = x.to(compute).chunk(2, dim=-1)
    grad = grad_out.to(compute)
    if approximate == "tanh":
        k = (2.0 / torch.pi) ** 0.5
        t = torch.tanh(k * (gate + 0.044715 * gate**3))
        gelu = 0.5 * gate * (1 + t)
        dgelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * k * (1 + 3 * 0.044715 * gate**2)
    else:
        cdf = 0.5 * (1 + torch.erf(gate * 0.5**0.5))
        gelu = gate * cdf
        dgelu = cdf + gate * torch.exp(-0.5 * gate * gate) / (2 * torch.pi) ** 0.5
    return torch.cat([grad * gelu, grad * value * dgelu], dim=-1).to(x.dtype)


def _out_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# --- Triton backend, wrapped as custom ops ------------------------------------------------------


@torch.library.custom_op("fastvision::geglu_triton_forward", mutates_args=())
def geglu_triton_forward(x: torch.Tensor, approximate: str) -> torch.Tensor:
    from fastvision.triton_kernels.geglu import geglu_forward

    return geglu_forward(x, approximate)


@torch.library.custom_op("fastvision::geglu_triton_backward", mutates_args=())
def geglu_triton_backward(grad_out: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    from fastvision.triton_kernels.geglu import geglu_backward

    return geglu_backward(grad_out, x, approximate)


# --- fake kernels and autograd for both compiled backends -----------------------------------------


def _register(forward: str, backward: str) -> None:
    backward_op = getattr(torch.ops.fastvision, backward).default

    torch.library.register_fake(f"fastvision::{forward}")(lambda x, approximate: _out_like(x))
    torch.library.register_fake(f"fastvision::{backward}")(
        lambda grad_out, x, approximate: x.new_empty(x.shape)
    )

    def setup_context(ctx, inputs, output):
        x, approximate = inputs
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    def backward_fn(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return backward_op(grad_out, x, ctx.approximate), None

    torch.library.register_autograd(f"fastvision::{forward}", backward_fn, setup_context=setup_context)


_register("geglu_triton_forward", "geglu_triton_backward")
CPP_OPS_BUILT = has_kernel("geglu_forward", "CPU")
if CPP_OPS_BUILT:
    _register("geglu_forward", "geglu_backward")


def geglu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GEGLU over the last dimension: ``x[..., :H] * gelu(x[..., H:])`` with ``H = x.shape[-1] // 2``.

    Args:
        x: ``[..., 2H]`` float32, float16 or bfloat16 tensor, any strides (math in float32).
        approximate: ``"none"`` for exact (erf) GELU, ``"tanh"`` for the tanh approximation.

    Returns:
        A new ``[..., H]`` tensor of ``x``'s dtype; ``x`` is never written.
    """
    check_tensor("x", x)
    check_choice("approximate", approximate, APPROXIMATIONS)
    check_dtype("x", x)
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        last = "a 0-d tensor" if x.dim() == 0 else f"last dimension {x.shape[-1]}"
        raise ValueError(f"x must have an even last dimension (value and gate halves), got {last}")
    backend = select_backend("geglu", x.device, IMPLEMENTED_BACKENDS, GPU_ORDER)
    if backend == "reference":
        return geglu_reference(x, approximate)
    if backend == "triton":
        return torch.ops.fastvision.geglu_triton_forward(x, approximate)
    return torch.ops.fastvision.geglu_forward(x, approximate)
