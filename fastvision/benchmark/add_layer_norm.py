"""add_layer_norm benchmark cases: forward, and forward + backward (one training step of the op),
against the eager reference, ``torch.compile`` of it, every fastvision backend, and Liger-Kernel's
LayerNorm (with the residual add done outside it) when present.

Traffic floor for ``[M, D]`` inputs of s bytes and float32 statistics: the forward's is
``OPS["add_layer_norm"].cost`` (reads x and residual and writes the output and per-row mean and
rstd, 3MDs + 8M, and reads the [D] parameters, 2Ds); the backward recomputes x + residual, so it
reads x, residual, the output gradient and the statistics and writes one input gradient, which
serves both inputs (4MDs + 8M), and reads weight and writes both parameter gradients (3Ds).
"""

from __future__ import annotations

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference

# The reference rounds x + residual to the storage dtype before normalizing; the kernels do not.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}
EPS = 1e-5


def _liger_layer_norm():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    return LigerLayerNormFunction


def _label(kind: str, x: torch.Tensor) -> str:
    return f"{kind} {str(x.dtype).removeprefix('torch.')} {x.shape[0]}x{x.shape[1]}"


def _forward_bytes(x, residual, weight, bias) -> int:
    return OPS["add_layer_norm"].cost_of(x, residual, weight, bias, EPS).bytes_moved


def _backward_bytes(x: torch.Tensor) -> int:
    rows, dim = x.shape
    return 4 * rows * dim * x.element_size() + 8 * rows + 3 * dim * x.element_size()


def _forward_case(x, residual, weight, bias, device: torch.device) -> BenchCase:
    impls = {
        "reference": lambda: add_layer_norm_reference(x, residual, weight, bias, EPS),
        "compile": (lambda f: lambda: f(x, residual, weight, bias, EPS))(
            torch.compile(add_layer_norm_reference)
        ),
    }
    for backend in OPS["add_layer_norm"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, lambda: add_layer_norm(x, residual, weight, bias, EPS))
    notes = {}
    liger = _liger_layer_norm()
    if liger is not None and device.type == "cuda":
        impls["liger"] = lambda: liger.apply(x + residual, weight, bias, EPS)
        notes["liger"] = "LigerLayerNorm has no residual input: x + residual is a separate eager add"
    return BenchCase(
        op="add_layer_norm",
        label=_label("fwd", x),
        impls=impls,
        bytes_moved=_forward_bytes(x, residual, weight, bias),
        dtype=x.dtype,
        tolerance=TOLERANCE[x.dtype],
        notes=notes,
        peer="liger" if "liger" in impls else None,
    )


def _training_step(fn, x, residual, weight, bias, grad_out):
    """Forward then backward of ``fn``: returns the output and the four gradients."""
    inputs = [t.detach().requires_grad_(True) for t in (x, residual, weight, bias)]

    def run():
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad_out))

    return run


def _forward_backward_case(x, residual, weight, bias, device: torch.device) -> BenchCase:
    grad_out = torch.randn_like(x)

    def step(fn):
        return _training_step(fn, x, residual, weight, bias, grad_out)

    def fused(x_, residual_, weight_, bias_):
        return add_layer_norm(x_, residual_, weight_, bias_, EPS)

    compiled = torch.compile(add_layer_norm_reference)
    impls = {
        "reference": step(lambda *a: add_layer_norm_reference(*a, EPS)),
        "compile": step(lambda *a: compiled(*a, EPS)),
    }
    for backend in OPS["add_layer_norm"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, step(fused))
    notes = {}
    liger = _liger_layer_norm()
    if liger is not None and device.type == "cuda":
        impls["liger"] = step(lambda x_, r_, w_, b_: liger.apply(x_ + r_, w_, b_, EPS))
        notes["liger"] = "LigerLayerNorm has no residual input: x + residual and its backward are eager"
    return BenchCase(
        op="add_layer_norm",
        label=_label("fwd+bwd", x),
        impls=impls,
        bytes_moved=_forward_bytes(x, residual, weight, bias) + _backward_bytes(x),
        dtype=x.dtype,
        tolerance=TOLERANCE[x.dtype],
        notes=notes,
        peer="liger" if "liger" in impls else None,
    )


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        shapes, dtypes = [(256, 1000)], [torch.float32]
    elif device.type != "cuda":
        shapes, dtypes = [(256, 1000), (1024, 1000)], [torch.float32]  # and 4x: the CPU order's range
    else:
        # Transformer widths (ViT-B 768, 1024, 4096) and rows of 8192 at 2^27 elements.
        shapes = [(16384, 768), (8192, 1024), (8192, 4096), (16384, 8192)]
        dtypes = [torch.bfloat16, torch.float32]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def random(shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=generator) * scale + shift).to(device=device, dtype=dtype)

    result = []
    for dtype in dtypes:
        for rows, dim in shapes:
            x, residual = random((rows, dim), dtype), random((rows, dim), dtype, shift=1.0)
            weight, bias = random((dim,), dtype, 0.1, 1.0), random((dim,), dtype, 0.1)
            result.append(_forward_case(x, residual, weight, bias, device))
            result.append(_forward_backward_case(x, residual, weight, bias, device))
    return result
