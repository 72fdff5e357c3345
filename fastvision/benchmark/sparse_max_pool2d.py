"""sparse_max_pool2d benchmark cases: forward and backward on random sparse maps (canonical coords,
up to 25% density), 2x2 windows with stride 2 (the seed-000 encoder) and 3x3 with stride 2 (overlap).

Traffic floor of the forward with N inputs, M outputs, C channels of s bytes and i-byte coords,
``OPS["sparse_max_pool2d"].cost``: read feats and coords (N*C*s + 3*N*i), write the pooled feats and
coords (M*C*s + 3*M*i); the argmax and window map saved for backward are extra traffic on
top of it. Backward: read the output gradient and the argmax (M*C*s + M*C: uint8 window offsets for
these kernels), write the input gradient (N*C*s).

``compile`` (torch.compile of the reference) is left out: the reference's output size is data-dependent
(``torch.unique``, ``.max()`` read back to size the key space), so dynamo breaks the graph there and
the compiled function runs the same eager kernels (measured: no faster than the reference on the CPU).
"""

from __future__ import annotations

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.sparse_max_pool2d import (
    sparse_max_pool2d,
    sparse_max_pool2d_reference,
)

CHANNELS = 64
DENSITY = 0.25
TOLERANCE = {torch.float32: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)}  # a max is exact
GRAD_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}


def random_sparse_map(sites: int, channels: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``sites`` active sites, at most 25% dense in 512x512 images; canonical int32 coords, random feats."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    side = 512
    images = -(-sites // int(DENSITY * side * side))
    flat = torch.randperm(images * side * side, generator=generator)[:sites].sort().values
    coords = torch.stack([flat // (side * side), flat // side % side, flat % side], 1).to(torch.int32)
    feats = torch.randn(sites, channels, generator=generator).to(dtype)
    return coords.to(device), feats.to(device)


def _impls(fn, device: torch.device) -> dict:
    impls = {}
    for backend in OPS["sparse_max_pool2d"].runnable(device)[1:]:
        impls[backend] = backend_impl(backend, fn)
    return impls


def _cases_for(
    sites: int, dtype: torch.dtype, kernel: int, stride: int, device: torch.device
) -> list[BenchCase]:
    coords, feats = random_sparse_map(sites, CHANNELS, dtype, device)
    out_coords, _ = sparse_max_pool2d_reference(coords, feats, kernel, stride)
    n, m, s = sites, out_coords.shape[0], feats.element_size()
    name = f"{str(dtype).removeprefix('torch.')} {sites // 1000}k sites x{CHANNELS} k{kernel}s{stride}"

    forward_impls = {"reference": lambda: sparse_max_pool2d_reference(coords, feats, kernel, stride)}
    # check_coords=False: time the kernels (the C++ ops validate the coords themselves).
    forward_impls |= _impls(
        lambda: sparse_max_pool2d(coords, feats, kernel, stride, check_coords=False), device
    )
    forward = BenchCase(
        op="sparse_max_pool2d",
        label=f"fwd {name} -> {m // 1000}k",
        impls=forward_impls,
        bytes_moved=OPS["sparse_max_pool2d"].cost_of(coords, feats, kernel, stride).bytes_moved,
        dtype=dtype,
        tolerance=TOLERANCE[dtype],
    )

    grad_out = torch.randn(m, CHANNELS, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype
    )
    leaf = feats.detach().requires_grad_(True)
    _, ref_out = sparse_max_pool2d_reference(coords, leaf, kernel, stride)
    backward_impls = {
        "reference": lambda: torch.autograd.grad(ref_out, leaf, grad_out, retain_graph=True)[0],
    }
    if len(forward_impls) > 1:
        # The backward op alone, on the argmax and window map the forward saved.
        geometry = ([kernel, kernel], [stride, stride])
        _, _, argmax, window_map, site = torch.ops.fastvision.sparse_max_pool2d_forward(
            coords, feats, *geometry, [-1, -1]
        )
        backward = lambda: torch.ops.fastvision.sparse_max_pool2d_backward(
            grad_out, argmax, window_map, site, *geometry
        )
        backward_impls |= _impls(backward, device)
    return [
        forward,
        BenchCase(
            op="sparse_max_pool2d",
            label=f"bwd {name}",
            impls=backward_impls,
            bytes_moved=m * CHANNELS * (s + 1) + n * CHANNELS * s,  # the argmax: uint8 window offsets
            dtype=dtype,
            tolerance=GRAD_TOLERANCE[dtype],
        ),
    ]


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        configs = [(10_000, torch.float32, 2, 2)]
    elif device.type != "cuda":
        # and 4x: the CPU order's range
        configs = [(n, torch.float32, k, 2) for n in (100_000, 400_000) for k in (2, 3)]
    else:
        configs = [
            (1_000_000, torch.float32, 2, 2),
            (4_000_000, torch.float32, 2, 2),
            (4_000_000, torch.bfloat16, 2, 2),
            (1_000_000, torch.float32, 3, 2),
        ]
    return [case for config in configs for case in _cases_for(*config, device)]
