"""masked_gather benchmark cases: the forward with and without ``max_count`` and the backward, against
the seed's vectorized reference, its per-sample loop, ``torch.compile`` of the reference (fixed
``max_count`` only), and every fastvision backend.

Traffic floor with B samples, S = H W sites, n gathered sites, C channels of e bytes and M slots,
``OPS["masked_gather"].cost``: the mask once (B S), the gathered elements once (n C e), the outputs
once (B M (C e + 8 + 1) + 8 B).
Backward: the slot gradients and slot sites once (B M (C e + 8)) and the zero-filled input gradient
(B C S e).
"""

from __future__ import annotations

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.masked_gather import masked_gather, masked_gather_loop_reference, masked_gather_reference

RATIO = 0.6


def _inputs(batch, channels, size, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, size, size, generator=generator) < RATIO
    x = torch.randn(batch, channels, size, size, generator=generator).to(device=device, dtype=dtype)
    return x, mask.to(device)


def _forward_case(x, mask, max_count, device, loop: bool) -> BenchCase:
    batch, channels, height, width = x.shape
    impls = {"reference": lambda: masked_gather_reference(x, mask, max_count)}
    if loop:
        impls["loop"] = lambda: masked_gather_loop_reference(x, mask, max_count)
    if max_count is not None:
        impls["compile"] = (lambda f: lambda: f(x, mask, max_count))(torch.compile(masked_gather_reference))
    for backend in OPS["masked_gather"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, lambda: masked_gather(x, mask, max_count))
    size = f"{batch}x{channels}x{height}x{width} M={'max' if max_count is None else max_count}"
    return BenchCase(
        op="masked_gather",
        label=f"fwd {str(x.dtype).removeprefix('torch.')} {size}",
        impls=impls,
        bytes_moved=OPS["masked_gather"].cost_of(x, mask, max_count).bytes_moved,
        dtype=x.dtype,
        tolerance=(0.0, 0.0),
        notes={"loop": "the per-sample loop the vectorized reference replaces"} if loop else {},
    )


def _backward_case(x, mask, max_count, device) -> BenchCase:
    batch, channels, height, width = x.shape
    leaf = x.detach().requires_grad_(True)
    grad_values = torch.randn((batch, max_count, channels), device=device, dtype=x.dtype)

    def backward_of(run):
        values = run().values
        return lambda: torch.autograd.grad(values, leaf, grad_values, retain_graph=True)[0]

    impls = {"reference": backward_of(lambda: masked_gather_reference(leaf, mask, max_count))}
    for backend in OPS["masked_gather"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, backward_of(lambda: masked_gather(leaf, mask, max_count)))
    element = x.element_size()
    moved = batch * max_count * (channels * element + 8) + batch * channels * height * width * element
    return BenchCase(
        op="masked_gather",
        label=f"bwd {str(x.dtype).removeprefix('torch.')} {batch}x{channels}x{height}x{width} M={max_count}",
        impls=impls,
        bytes_moved=moved,
        dtype=x.dtype,
        tolerance=(0.0, 0.0),
    )


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        shapes = [(8, 16, 32)]
    elif device.type == "cuda":
        shapes = [(256, channels, 64) for channels in (2, 16, 64)]
    else:
        shapes = [(64, 16, 64), (256, 16, 64)]  # and 4x: the CPU order's range
    result = []
    for batch, channels, size in shapes:
        for dtype in (torch.float32,) if device.type != "cuda" else (torch.float32, torch.bfloat16):
            x, mask = _inputs(batch, channels, size, dtype, device)
            max_count = int(size * size * RATIO * 1.1)  # room above the expected count
            result.append(_forward_case(x, mask, None, device, loop=True))
            result.append(_forward_case(x, mask, max_count, device, loop=False))
            result.append(_backward_case(x, mask, max_count, device))
    return result
