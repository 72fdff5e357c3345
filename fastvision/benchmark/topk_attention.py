"""Top-k sparse attention benchmark: forward and forward+backward against the reference,
``torch.compile`` of it and the Triton backend, plus a dense ``F.scaled_dot_product_attention``
case at each size (the dense baseline the top-k cases are compared with).

FLOPs count the attention proper, ``OPS["topk_attention"].cost``: ``4 B H Nq topk D`` forward
(scores and weighted sum over the selected keys), three times that for forward+backward. The
selection's ``2 B H Nq Nk D`` of score matmul is work the sparse op adds and is not counted. The
dense cases count the same cost at ``topk = Nk``, ``4 B H Nq Nk D`` (and three times that), so their
TFLOP/s are comparable with flash attention's.

Inputs are multiples of 1/2 in [-1, 1] (values are random normal): every score is then an exact
float32 number in every implementation, so all of them select the same keys (ties by the lower
index) and outputs can be compared; random continuous inputs would make implementations that
round a near-tie differently select different keys. The reference and its compiled form compute
in float32 from the bfloat16 inputs, as the kernels do. Where the dense ``[B, H, Nq, Nk]`` scores
would not fit, the reference runs over query chunks (same math) and ``compile`` is left out.

On CUDA each implementation's peak memory (``torch.cuda.max_memory_allocated`` over its first
call, above what was allocated before it) is recorded in the case notes when it first runs
(``compile``'s first call includes compilation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.topk_attention import topk_attention, topk_attention_reference

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
HEAD_DIMS = (64, 128)
TOPKS = (32, 64, 128)
# (batch, heads): B * H = 32 at every size; B * H = 256 at D = 64 up to N = 16K.
BATCH_HEADS = ((4, 8), (32, 8))
LENGTHS = (1024, 4096, 16384, 32768)
# Score elements of the dense reference (and its compiled form) at most; above, query chunks.
DENSE_SCORE_LIMIT = 1 << 31
CHUNK_SCORE_ELEMENTS = 1 << 28


def _quantized(shape, generator, device, dtype):
    return (torch.randint(-2, 3, shape, generator=generator) / 2).to(device=device, dtype=dtype)


def attention_inputs(shape, generator, device, dtype):
    """``q, k`` (quantized: exact scores), ``v`` and an output gradient, all of ``shape``."""
    q, k = (_quantized(shape, generator, device, dtype) for _ in range(2))
    v = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    grad_out = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return q, k, v, grad_out


def _reference_fn(q, k, v, topk, grad_out, chunked: bool) -> Callable[[], Any]:
    """Reference in float32: the output, or (out, dq, dk, dv) when ``grad_out`` is given. Chunked:
    the same math over query chunks (the loss is a sum over queries, so per-chunk gradients of k
    and v add up to the full ones)."""
    dtype = q.dtype
    batch, heads, num_queries, _ = q.shape
    chunk = max(1, CHUNK_SCORE_ELEMENTS // (batch * heads * k.shape[2])) if chunked else num_queries

    def forward():
        with torch.no_grad():
            parts = [
                topk_attention_reference(q[:, :, s : s + chunk].float(), k.float(), v.float(), topk)
                for s in range(0, num_queries, chunk)
            ]
        return torch.cat(parts, dim=2).to(dtype)

    def forward_backward():
        kf = k.detach().float().requires_grad_(True)
        vf = v.detach().float().requires_grad_(True)
        dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
        outs, dqs = [], []
        for s in range(0, num_queries, chunk):
            qc = q[:, :, s : s + chunk].detach().float().requires_grad_(True)
            out = topk_attention_reference(qc, kf, vf, topk)
            dq, dk_part, dv_part = torch.autograd.grad(
                out, (qc, kf, vf), grad_out[:, :, s : s + chunk].float()
            )
            outs.append(out.detach())
            dqs.append(dq)
            dk += dk_part
            dv += dv_part
        return tuple(t.to(dtype) for t in (torch.cat(outs, dim=2), torch.cat(dqs, dim=2), dk, dv))

    return forward if grad_out is None else forward_backward


def _compiled_fn(q, k, v, topk, grad_out) -> Callable[[], Any]:
    dtype = q.dtype

    def attention(qf, kf, vf):
        return topk_attention_reference(qf.float(), kf.float(), vf.float(), topk).to(dtype)

    compiled = torch.compile(attention)
    return _op_fn(compiled, q, k, v, grad_out)


def _op_fn(attention, q, k, v, grad_out) -> Callable[[], Any]:
    """``attention(q, k, v)``: forward only, or (out, dq, dk, dv) when ``grad_out`` is given."""
    if grad_out is None:

        def forward():
            with torch.no_grad():
                return attention(q, k, v)

        return forward
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def forward_backward():
        out = attention(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))

    return forward_backward


def _measure_first_call(case: BenchCase, name: str, fn: Callable[[], Any], device) -> Callable[[], Any]:
    """``fn``, whose first call also records its peak memory in ``case.notes[name]``."""
    measured = False

    def run():
        nonlocal measured
        if measured:
            return fn()
        measured = True
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        note = f"peak memory {peak:.0f} MiB above inputs (first call)"
        case.notes[name] = f"{case.notes[name]}; {note}" if name in case.notes else note
        return out

    return run


def _add_memory_notes(case: BenchCase, device: torch.device) -> BenchCase:
    if device.type == "cuda":
        case.impls = {name: _measure_first_call(case, name, fn, device) for name, fn in case.impls.items()}
    return case


def _mode(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def _topk_case(q, k, v, topk, grad_out, device) -> BenchCase:
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    dense_fits = batch * heads * num_queries * num_keys <= DENSE_SCORE_LIMIT
    impls = {"reference": _reference_fn(q, k, v, topk, grad_out, chunked=not dense_fits)}
    notes = {"reference": "float32 math" + ("" if dense_fits else ", over query chunks")}
    if dense_fits:
        impls["compile"] = _compiled_fn(q, k, v, topk, grad_out)
    for backend in OPS["topk_attention"].runnable(device)[1:]:
        impls[backend] = backend_impl(
            backend, _op_fn(lambda a, b, c: topk_attention(a, b, c, topk), q, k, v, grad_out)
        )
    flops = OPS["topk_attention"].cost_of(q, k, v, topk).flops
    backward = grad_out is not None
    return BenchCase(
        op="topk_attention",
        label=f"{_mode(backward)} {str(q.dtype).removeprefix('torch.')} BH{batch * heads} N{num_queries} "
        f"D{head_dim} k{topk}",
        impls=impls,
        flops=3 * flops if backward else flops,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes=notes,
    )


def _sdpa_fn(q, k, v, grad_out, backend) -> Callable[[], Any]:
    """F.scaled_dot_product_attention restricted to one SDPA backend (flash, memory-efficient)."""
    from torch.nn.attention import sdpa_kernel

    def attention(a, b, c):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(a, b, c)

    return _op_fn(attention, q, k, v, grad_out)


def _dense_case(q, k, v, grad_out, device=None) -> BenchCase:
    """Dense attention at the same size: F.scaled_dot_product_attention is the baseline here, with
    its flash and memory-efficient backends forced on CUDA (the crossover compares with the fastest)."""
    batch, heads, num_queries, head_dim = q.shape
    flops = OPS["topk_attention"].cost_of(q, k, v, k.shape[2]).flops  # top-Nk attention is dense attention
    backward = grad_out is not None
    impls = {"reference": _op_fn(F.scaled_dot_product_attention, q, k, v, grad_out)}
    if device is not None and device.type == "cuda":
        from torch.nn.attention import SDPBackend

        impls["sdpa-flash"] = _sdpa_fn(q, k, v, grad_out, SDPBackend.FLASH_ATTENTION)
        impls["sdpa-mem-efficient"] = _sdpa_fn(q, k, v, grad_out, SDPBackend.EFFICIENT_ATTENTION)
    return BenchCase(
        op="topk_attention",
        label=f"{_mode(backward)} {str(q.dtype).removeprefix('torch.')} BH{batch * heads} N{num_queries} "
        f"D{head_dim} dense",
        impls=impls,
        flops=3 * flops if backward else flops,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes={"reference": "sdpa: dense F.scaled_dot_product_attention (all Nk keys), the baseline"},
    )


def _sizes() -> list[tuple[tuple[int, int], int, int]]:
    """((batch, heads), N, D) of the GPU cases: B * H = 32 at every N and D; 256 at D = 64, N <= 16K."""
    sizes = [(BATCH_HEADS[0], n, d) for d in HEAD_DIMS for n in LENGTHS]
    return sizes + [(BATCH_HEADS[1], n, 64) for n in LENGTHS if n <= 16384]


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    """Token top-k and dense SDPA cases; on a GPU (not quick) also the block top-k cases of
    ``fastvision.benchmark.block_topk_attention`` (block mode, FlexAttention with the block mask, SDPA
    flash and memory-efficient), so that ``fastvision bench --op topk_attention`` covers both modes
    and prints both crossovers (the runner runs a case that two ops list only once)."""
    if quick or device.type != "cuda":
        sizes, topks, dtype = [((1, 2), 64, 16)], (8,), torch.float32
    else:
        sizes, topks, dtype = _sizes(), TOPKS, torch.bfloat16
    generator = torch.Generator(device="cpu").manual_seed(0)
    result = []
    for (batch, heads), length, head_dim in sizes:
        q, k, v, grad_out = attention_inputs((batch, heads, length, head_dim), generator, device, dtype)
        for backward in (False, True):
            g = grad_out if backward else None
            for topk in topks:
                result.append(_add_memory_notes(_topk_case(q, k, v, topk, g, device), device))
            result.append(_add_memory_notes(_dense_case(q, k, v, g, device), device))
    if not quick and device.type == "cuda":
        from fastvision.benchmark import block_topk_attention

        result += block_topk_attention.cases(device, quick)
    return result
