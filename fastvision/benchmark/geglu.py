"""GEGLU benchmark cases: forward and backward, exact and tanh GELU, against the eager reference,
``torch.compile`` of it, every fastvision backend and Liger-Kernel's GEGLU (tanh only) when present.

Forward traffic floor: ``OPS["geglu"].cost`` (read 2N, write N: 3Ns for N outputs of s bytes).
Backward: reads value, gate and the output gradient (3N) and writes both input gradients (2N) (5Ns).
"""

from __future__ import annotations

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.benchmark.timing import distribution_version
from fastvision.ops import OPS
from fastvision.ops.geglu import geglu, geglu_backward_reference, geglu_reference

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
HIDDEN = 4096


def _liger_gelu_mul():
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
    except ImportError:
        return None
    return LigerGELUMulFunction


def _backward_ops(backend: str):
    return OPS["geglu"].kernels[backend].backward_op()


def _forward_case(x: torch.Tensor, approximate: str, device: torch.device) -> BenchCase:
    impls = {
        "reference": lambda: geglu_reference(x, approximate),
        "compile": (lambda f: lambda: f(x, approximate))(torch.compile(geglu_reference)),
    }
    for backend in OPS["geglu"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, lambda: geglu(x, approximate))
    notes = {}
    liger = _liger_gelu_mul()
    if liger is not None and approximate == "tanh" and device.type == "cuda":
        gate, value = x[..., HIDDEN:].contiguous(), x[..., :HIDDEN].contiguous()
        impls["liger"] = lambda: liger.apply(gate, value)
        notes["liger"] = (
            f"liger-kernel {distribution_version('liger-kernel')}: LigerGELUMulFunction(gate, value), "
            "separate contiguous gate and value tensors"
        )
    return BenchCase(
        op="geglu",
        label=f"fwd {approximate} {str(x.dtype).removeprefix('torch.')} {x.shape[0]}x{x.shape[1]}",
        impls=impls,
        bytes_moved=OPS["geglu"].cost_of(x, approximate).bytes_moved,
        dtype=x.dtype,
        tolerance=TOLERANCE[x.dtype],
        notes=notes,
        peer="liger" if "liger" in impls else None,
    )


def _backward_case(x: torch.Tensor, approximate: str, device: torch.device) -> BenchCase:
    n_out = x.numel() // 2
    grad_out = torch.randn(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=device)
    x_ref = x.detach().requires_grad_(True)
    out_ref = geglu_reference(x_ref, approximate)
    impls = {
        # The eager reference's own backward (autograd through chunk and gelu).
        "reference": lambda: torch.autograd.grad(out_ref, x_ref, grad_out, retain_graph=True)[0],
        # Inductor's fusion of the closed-form backward.
        "compile": (lambda f: lambda: f(grad_out, x, approximate))(torch.compile(geglu_backward_reference)),
    }
    for backend in OPS["geglu"].runnable(device)[1:]:
        impls[backend] = (lambda op: lambda: op(grad_out, x, approximate))(_backward_ops(backend))
    notes, adapt = {}, {}
    liger = _liger_gelu_mul()
    if liger is not None and approximate == "tanh" and device.type == "cuda":
        hidden = x.shape[1] // 2
        gate = x[..., hidden:].contiguous().requires_grad_(True)
        value = x[..., :hidden].contiguous().requires_grad_(True)
        out_liger = liger.apply(gate, value)

        def liger_backward():
            return torch.autograd.grad(out_liger, (gate, value), grad_out, retain_graph=True)

        impls["liger"] = liger_backward
        # Timed as Liger returns it (two gradients); joined to the reference's one gradient only for
        # the check, outside the timing.
        adapt["liger"] = lambda grads: torch.cat([grads[1], grads[0]], dim=-1)
        notes["liger"] = (
            f"liger-kernel {distribution_version('liger-kernel')}: backward of LigerGELUMulFunction as it "
            "returns it (d_gate, d_value); the cat to one gradient is done for the check only, not timed"
        )
    return BenchCase(
        op="geglu",
        label=f"bwd {approximate} {str(x.dtype).removeprefix('torch.')} {x.shape[0]}x{x.shape[1]}",
        impls=impls,
        bytes_moved=5 * n_out * x.element_size(),
        dtype=x.dtype,
        tolerance=TOLERANCE[x.dtype],
        notes=notes,
        adapt=adapt,
        peer="liger" if "liger" in impls else None,
    )


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        sizes, dtypes = [(256, 2 * 256)], [torch.float32]
    elif device.type != "cuda":
        sizes, dtypes = [(256, 2 * 256), (1024, 2 * 256)], [torch.float32]  # and 4x: the CPU order's range
    else:
        sizes = [(rows, 2 * HIDDEN) for rows in (1 << 12, 1 << 14, 1 << 16)]  # 2^24 .. 2^28 outputs
        dtypes = [torch.bfloat16, torch.float32]
    generator = torch.Generator(device="cpu").manual_seed(0)
    result = []
    for dtype in dtypes:
        for shape in sizes:
            x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
            for approximate in ("none", "tanh"):
                result.append(_forward_case(x, approximate, device))
                result.append(_backward_case(x, approximate, device))
    return result
