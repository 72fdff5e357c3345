"""grn benchmark cases: forward and forward + backward of ConvNeXt V2's GRN on channels-last
activations, against the eager reference, ``torch.compile`` of it and every fastvision backend.

Traffic floor with N = B H W C elements of e bytes, the least DRAM traffic of any schedule: the
forward's is ``OPS["grn"].cost`` (x read once, the output written once: 2 N e); the backward reads x
and the output gradient once and writes the input gradient once (3 N e). The one-pass kernel meets it
(its second walk of a sample reads L2); the two-pass fallback reads x (and the gradient) twice.
"""

from __future__ import annotations

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.grn import grn, grn_reference

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _inputs(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    gamma = (torch.randn(shape[-1], generator=generator) * 0.1).to(device)
    beta = (torch.randn(shape[-1], generator=generator) * 0.1).to(device)
    mask = (torch.rand(shape[:3], generator=generator) < 0.6).to(device)
    return x, gamma, beta, mask


def _label(kind, x, masked):
    size = "x".join(str(d) for d in x.shape)
    return f"{kind} {str(x.dtype).removeprefix('torch.')} {size}{' masked' if masked else ''}"


def _forward_bytes(x, gamma, beta, mask) -> int:
    return OPS["grn"].cost_of(x, gamma, beta, 1e-6, mask).bytes_moved


def _forward_case(x, gamma, beta, mask, device) -> BenchCase:
    impls = {
        "reference": lambda: grn_reference(x, gamma, beta, 1e-6, mask),
        "compile": (lambda f: lambda: f(x, gamma, beta, 1e-6, mask))(torch.compile(grn_reference)),
    }
    for backend in OPS["grn"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, lambda: grn(x, gamma, beta, 1e-6, mask))
    return BenchCase(
        op="grn", label=_label("fwd", x, mask is not None), impls=impls,
        bytes_moved=_forward_bytes(x, gamma, beta, mask), dtype=x.dtype, tolerance=TOLERANCE[x.dtype],
    )  # fmt: skip


def _step_case(x, gamma, beta, mask, device) -> BenchCase:
    grad_out = torch.randn_like(x)
    # gamma's and beta's gradients sum over every site (B H W terms): their float32 rounding grows
    # with that count, so they are scaled by 1 / sqrt(B H W) (in every timed call alike) and one
    # tolerance serves all three gradients.
    sites_scale = max(x.numel() // max(x.shape[-1], 1), 1) ** -0.5

    def step(fn):
        def run():
            leaves = [t.detach().requires_grad_(True) for t in (x, gamma, beta)]
            out = fn(*leaves, 1e-6, mask)
            dx, dgamma, dbeta = torch.autograd.grad(out, leaves, grad_out)
            return dx, dgamma * sites_scale, dbeta * sites_scale

        return run

    impls = {"reference": step(grn_reference), "compile": step(torch.compile(grn_reference))}
    for backend in OPS["grn"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, step(grn))
    return BenchCase(
        op="grn", label=_label("fwd+bwd", x, mask is not None), impls=impls,
        bytes_moved=_forward_bytes(x, gamma, beta, mask) + 3 * x.numel() * x.element_size(),
        dtype=x.dtype, tolerance=TOLERANCE[x.dtype],
    )  # fmt: skip


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        shapes, dtypes = [(8, 14, 14, 64)], [torch.float32]
    elif device.type == "cuda":
        shapes, dtypes = [(256, 56, 56, 96), (256, 14, 14, 384)], [torch.bfloat16, torch.float32]
    else:
        # and 4x: the CPU order's range
        shapes, dtypes = [(32, 28, 28, 64), (128, 28, 28, 64)], [torch.float32]
    result = []
    for dtype in dtypes:
        for shape in shapes:
            x, gamma, beta, mask = _inputs(shape, dtype, device)
            for masked in (None, mask):
                result.append(_forward_case(x, gamma, beta, masked, device))
                result.append(_step_case(x, gamma, beta, masked, device))
    return result
