"""selective_scan benchmark cases: forward and forward + backward with Mamba's layout (varying B and C,
D, z gating, delta bias and softplus), against the sequential reference, every fastvision backend,
and mamba-ssm's CUDA ``selective_scan_fn`` through the op's ``mamba_ssm`` backend (a row when mamba-ssm
imports and the device is CUDA; else the reference row's note says why there is none). Inputs are
continuous random values (normal u, delta, z, B, C; uniform A), never quantized.

Traffic floor with ``b d L`` elements of e bytes and ``b N L`` of B and C: the forward's is
``OPS["selective_scan"].cost`` (reads u, delta, z once, 3 b d L e, and B, C once, 2 b N L e, and
writes the output, b d L e); forward + backward counts three times that (the backward reads the
inputs and the output gradient twice and writes du, ddelta, dz, dB, dC). FLOPs: the forward's cost,
about 6 N per step and channel, plus about 20 N per step and channel backward.
"""

from __future__ import annotations

import torch

from fastvision._backend import PEER_BACKENDS, why_unusable
from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.selective_scan import selective_scan, selective_scan_reference

TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (5e-2, 5e-2)}


def mamba_ssm_missing(device: torch.device) -> str | None:
    """Why the mamba-ssm row (the op's ``mamba_ssm`` backend) cannot run on ``device``, or None when it
    can (mamba-ssm is the 'mamba' extra: a CUDA build of mamba_ssm)."""
    return why_unusable("mamba_ssm", device)


def _inputs(batch, dim, length, state, dtype, device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u, delta, z = (r(batch, dim, length, scale=s).to(dtype) for s in (1.0, 0.5, 1.0))
    A = -torch.rand(dim, state, generator=g).to(device) - 0.05
    B, C = r(batch, state, length).to(dtype), r(batch, state, length).to(dtype)
    return u, delta, A, B, C, r(dim), z, r(dim, scale=0.1)


def _label(kind, batch, dim, length, state, dtype):
    return f"{kind} {str(dtype).removeprefix('torch.')} b{batch} d{dim} L{length} N{state}"


def _cases_for(batch, dim, length, state, dtype, device, reference: bool) -> list[BenchCase]:
    args = _inputs(batch, dim, length, state, dtype, device)
    forward = OPS["selective_scan"].cost_of(*args, True)
    backward_flops = 20 * state * batch * dim * length
    missing = mamba_ssm_missing(device)

    def run_forward(fn):
        return lambda: fn(*args, True)

    def step(fn):
        def run():
            leaves = [t.detach().requires_grad_(True) for t in args[:5]]
            out = fn(*leaves, *args[5:], True)
            return torch.autograd.grad(out.float().square().sum(), leaves)

        return run

    result = []
    for kind, make, moved, flops in (
        ("fwd", run_forward, forward.bytes_moved, forward.flops),
        ("fwd+bwd", step, 3 * forward.bytes_moved, forward.flops + backward_flops),
    ):
        impls = {"reference": make(selective_scan_reference)} if reference else {}
        first = "reference"
        for backend in OPS["selective_scan"].runnable(device)[1:]:
            if backend not in PEER_BACKENDS:
                impls[backend] = backend_impl(backend, make(selective_scan))
        if not reference:  # the first backend stands as the reference the others are checked against
            first = next(iter(impls))
            impls = {"reference": impls.pop(first), **impls}
        notes = {} if reference else {"reference": f"{first}: the sequential reference is too slow"}
        if missing is None:
            impls["mamba_ssm"] = backend_impl("mamba_ssm", make(selective_scan))
        else:  # the table says why the peer has no row (on the reference row: a failed row fails the run)
            said = f"{notes['reference']}; " if "reference" in notes else ""
            notes["reference"] = f"{said}no mamba_ssm row: {missing}"
        result.append(
            BenchCase(
                op="selective_scan", label=_label(kind, batch, dim, length, state, dtype), impls=impls,
                bytes_moved=moved, flops=flops, dtype=dtype, tolerance=TOLERANCE[dtype],
                peer="mamba_ssm" if missing is None else None,
                notes=notes,
            )  # fmt: skip
        )
    return result


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick:
        return _cases_for(1, 16, 64, 16, torch.float32, device, reference=True)
    if device.type != "cuda":
        return _cases_for(2, 256, 512, 16, torch.float32, device, reference=True)
    result = []
    for dtype in (torch.bfloat16, torch.float32):
        result += _cases_for(2, 256, 512, 16, dtype, device, reference=True)
        for dim, length in ((1024, 2048), (1024, 4096)):
            result += _cases_for(4, dim, length, 16, dtype, device, reference=False)
    return result
