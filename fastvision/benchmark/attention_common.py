"""What the token and block top-k attention benchmarks share: their inputs, the callables that run
an attention forward (and backward), the dense SDPA baseline case, FlexAttention given a block mask,
and peak-memory notes. Both benchmark modules import this one, never each other.

Inputs are drawn from continuous distributions (random normal): no quantization that would make
every score exact and inflate ties at the top-k threshold. The price is that an implementation
rounding a near-tie differently from the reference may select another key for a few queries; the
cases allow ``MISMATCHED_ROWS`` of output rows outside the tolerance for that and say so in their
note (a wrong kernel differs in far more rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastvision.benchmark.case import BenchCase
from fastvision.ops import OPS

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
# Share of output rows (last-dim vectors) that may fall outside the tolerance: near-tie selections.
MISMATCHED_ROWS = 0.002
MISMATCH_NOTE = (
    f"continuous inputs: up to {MISMATCHED_ROWS:.1%} of rows may select another key at a near-tie"
)


def attention_inputs(shape, generator, device, dtype):
    """``q, k, v`` and an output gradient of ``shape``, random normal (continuous)."""
    return tuple(torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4))


def mode(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def label(q: torch.Tensor, backward: bool) -> str:
    batch, heads, num_queries, head_dim = q.shape
    dtype = str(q.dtype).removeprefix("torch.")
    return f"{mode(backward)} {dtype} BH{batch * heads} N{num_queries} D{head_dim}"


def op_fn(attention, q, k, v, grad_out) -> Callable[[], Any]:
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


def sdpa_fn(q, k, v, grad_out, backend) -> Callable[[], Any]:
    """F.scaled_dot_product_attention restricted to one SDPA backend (flash, memory-efficient)."""
    from torch.nn.attention import sdpa_kernel

    def attention(a, b, c):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(a, b, c)

    return op_fn(attention, q, k, v, grad_out)


def dense_case(op: str, q, k, v, grad_out, device: torch.device | None) -> BenchCase:
    """Dense attention at the same size, the baseline ``op``'s sparse cases are compared with:
    F.scaled_dot_product_attention, with its flash and memory-efficient backends forced on CUDA (the
    crossover compares with the fastest). FLOPs: ``4 B H Nq Nk D`` (top-Nk attention is dense)."""
    cost = OPS["topk_attention"].cost_of(q, k, v, k.shape[2])
    flops = cost.flops
    backward = grad_out is not None
    impls = {"reference": op_fn(F.scaled_dot_product_attention, q, k, v, grad_out)}
    if device is not None and device.type == "cuda":
        from torch.nn.attention import SDPBackend

        impls["sdpa-flash"] = sdpa_fn(q, k, v, grad_out, SDPBackend.FLASH_ATTENTION)
        impls["sdpa-mem-efficient"] = sdpa_fn(q, k, v, grad_out, SDPBackend.EFFICIENT_ATTENTION)
    return BenchCase(
        op=op,
        label=f"{label(q, backward)} dense",
        impls=impls,
        flops=3 * flops if backward else flops,
        # The backward reads q, k, v, out and its gradient and writes dq, dk, dv: 2x the forward's bytes.
        bytes_moved=3 * cost.bytes_moved if backward else cost.bytes_moved,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes={"reference": f"{op}: dense F.scaled_dot_product_attention over all Nk keys, the baseline"},
        baselines=tuple(name for name in impls if name != "reference"),
        flop_class="wgmma" if q.dtype in (torch.float16, torch.bfloat16) else "cuda_core",
    )


# FlexAttention's default (not max-autotune) backward tiles on sm_90 for 16-bit inputs are 64 x 128
# rows (torch 2.11 .. 2.14, torch/_inductor/template_heuristics): its backward only compiles with
# mask blocks that are multiples of 128 rows.
FLEX_BACKWARD_BLOCK = 128


def flex_block_fn(
    q, k, v, grad_out, selected: torch.Tensor, block_size: int
) -> tuple[Callable[[], Any], str] | None:
    """(FlexAttention over the blocks ``selected`` ``[B, H, Nq / block_size, Nk / block_size]`` marks,
    a note for the row), or ``None`` where FlexAttention cannot run (no CUDA, an old torch). The
    block mask is built here, once, outside the timing. Forward: at ``BLOCK_SIZE=block_size`` with
    kernel tiles of the same size (the default 128-row mask blocks would make it compute up to
    128 / block_size times the selected work). Backward: at ``FLEX_BACKWARD_BLOCK`` rows, the
    smallest its default backward tiles accept; the note says so."""
    if q.device.type != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    batch, heads, num_queries, _ = q.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // block_size, kv_idx // block_size]

    if grad_out is None:
        mask_block, options = block_size, {"BLOCK_M": block_size, "BLOCK_N": block_size}
        note = f"FlexAttention (torch {torch.__version__}, compiled), block mask at BLOCK_SIZE={block_size} "
        note += "(the selection's), "
        note += "kernel tiles of the same size; the mask is built once, not timed"
    else:
        mask_block = max(block_size, FLEX_BACKWARD_BLOCK)
        options = {}
        note = f"FlexAttention (torch {torch.__version__}, compiled), block mask at BLOCK_SIZE={mask_block}: "
        note += "its default backward "
        note += "tiles need 128-row mask blocks, so it computes up to "
        note += f"{mask_block // block_size}x the selected work; the mask is built once, not timed"
    block_mask = create_block_mask(
        mask_mod, batch, heads, num_queries, k.shape[2], device=q.device, BLOCK_SIZE=mask_block
    )
    compiled = torch.compile(flex_attention)

    def attention(a, b, c):
        return compiled(a, b, c, block_mask=block_mask, kernel_options=options or None)

    return op_fn(attention, q, k, v, grad_out), note


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


def add_memory_notes(case: BenchCase, device: torch.device) -> BenchCase:
    """On CUDA, each implementation's peak memory over its first call goes into the case notes."""
    if device.type == "cuda":
        case.impls = {name: _measure_first_call(case, name, fn, device) for name, fn in case.impls.items()}
    return case
