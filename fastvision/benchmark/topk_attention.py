"""Top-k sparse attention benchmark: forward and forward+backward against the reference,
``torch.compile`` of it and the Triton backend, plus a dense ``F.scaled_dot_product_attention``
case at each size (the dense baseline the top-k cases are compared with).

FLOPs count the attention proper, ``OPS["topk_attention"].cost``: ``4 B H Nq topk D`` forward
(scores and weighted sum over the selected keys), three times that for forward+backward. The
selection's ``2 B H Nq Nk D`` of score matmul is work the sparse op adds and is not counted. The
dense cases count the same cost at ``topk = Nk``, ``4 B H Nq Nk D`` (and three times that), so their
TFLOP/s are comparable with flash attention's.

Inputs are random normal (``attention_common.attention_inputs``: continuous, no quantization that
would inflate ties at the top-k threshold); an implementation that rounds a near-tie differently
may select another key for a few queries, which the check allows for a small share of rows
(``attention_common.MISMATCHED_ROWS``). The reference and its compiled form compute in float32
from the bfloat16 inputs, as the kernels do. Where the dense ``[B, H, Nq, Nk]`` scores
would not fit, the reference runs over query chunks (same math) and ``compile`` is left out.

On CUDA each implementation's peak memory (``torch.cuda.max_memory_allocated`` over its first
call, above what was allocated before it) is recorded in the case notes when it first runs
(``compile``'s first call includes compilation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastvision.benchmark.attention_common import (
    MISMATCH_NOTE,
    MISMATCHED_ROWS,
    TOLERANCE,
    add_memory_notes,
    attention_inputs,
    dense_case,
    label,
    op_fn,
)
from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.topk_attention import topk_attention, topk_attention_reference

HEAD_DIMS = (64, 128)
TOPKS = (32, 64, 128)
# (batch, heads): B * H = 32 at every size; B * H = 256 at D = 64 up to N = 16K.
BATCH_HEADS = ((4, 8), (32, 8))
LENGTHS = (1024, 4096, 16384, 32768)
# Score elements of the dense reference (and its compiled form) at most; above, query chunks.
DENSE_SCORE_LIMIT = 1 << 31
CHUNK_SCORE_ELEMENTS = 1 << 28


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
    return op_fn(compiled, q, k, v, grad_out)


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
            backend, op_fn(lambda a, b, c: topk_attention(a, b, c, topk), q, k, v, grad_out)
        )
        notes[backend] = MISMATCH_NOTE
    cost = OPS["topk_attention"].cost_of(q, k, v, topk)
    flops = cost.flops
    backward = grad_out is not None
    # Issue term of the cost model: the selection scores every query-key pair, the forward every
    # selected pair (the kernels' SASS_LOOP_WORK units); the backward kernels declare none.
    scores = {"_select_topk_kernel": batch * heads * num_queries * num_keys}
    scores["_sparse_forward_kernel"] = batch * heads * num_queries * topk
    return BenchCase(
        op="topk_attention",
        label=f"{label(q, backward)} k{topk}",
        impls=impls,
        flops=3 * flops if backward else flops,
        # The backward reads q, k, v, out and its gradient and writes dq, dk, dv: 2x the forward's bytes.
        bytes_moved=3 * cost.bytes_moved if backward else cost.bytes_moved,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes=notes,
        max_mismatched_rows=MISMATCHED_ROWS,
        hot_loop_scores=scores,
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
                result.append(add_memory_notes(_topk_case(q, k, v, topk, g, device), device))
            result.append(add_memory_notes(dense_case("topk_attention", q, k, v, g, device), device))
    if not quick and device.type == "cuda":
        from fastvision.benchmark import block_topk_attention

        result += block_topk_attention.cases(device, quick)
    return result
