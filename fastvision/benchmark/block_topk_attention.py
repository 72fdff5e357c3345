"""Block top-k sparse attention benchmark: forward and forward+backward of the reference, the Triton
backend and FlexAttention given the same block mask (the peer, when ``torch.nn.attention.flex_attention``
runs on the device), with dense SDPA cases at each size as the baseline to beat
(``sdpa-flash`` and ``sdpa-mem-efficient`` on CUDA).

GPU sizes (bf16, B * H = 32): N = 1K, 4K, 16K, 32K; D = 64 and 128; ``topk_blocks * block_size`` of
32 (blocks of 32), 128 (blocks of 64) and ``N / 8`` (blocks of 64, the goal's bound: faster than
flash SDPA for N >= 8192 at that sparsity). FLOPs count the attention proper,
``OPS["block_topk_attention"].cost``: ``4 B H Nq topk_blocks block_size D`` (three times that with
the backward); the dense cases count ``4 B H Nq Nk D`` (``OPS["topk_attention"].cost`` at
``topk = Nk``), so TFLOP/s compare with flash attention's and the time ratio is the speed-up.

Inputs are multiples of 1/2 in [-1, 1]: block means (of up to 128 rows) and block scores are then
exact float32 numbers in every implementation, so all select the same blocks. FlexAttention gets the
selection computed by the definition beforehand, as a ``mask_mod`` over the selected blocks; building
its block mask is not timed. Where the dense scores would not fit, the reference runs over query
chunks aligned to the blocks (the same math: each query block depends on its own rows only).
Peak memory per implementation is noted on CUDA (first call), as in the topk_attention benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.benchmark.topk_attention import _add_memory_notes, _op_fn, _sdpa_fn, attention_inputs
from fastvision.ops import OPS
from fastvision.ops.block_topk_attention import (
    block_selection_mask,
    block_topk_attention,
    block_topk_attention_reference,
)

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
BATCH_HEADS = (4, 8)
LENGTHS = (1024, 4096, 16384, 32768)
HEAD_DIMS = (64, 128)
DENSE_SCORE_LIMIT = 1 << 31
CHUNK_SCORE_ELEMENTS = 1 << 28


def _settings(length: int) -> list[tuple[int, int]]:
    """(topk_blocks, block_size): 32 and 128 selected keys, and N / 8 (blocks of 64)."""
    settings = [(1, 32), (2, 64)]
    if length >= 8192:
        settings.append((length // 8 // 64, 64))
    return settings


def _reference_fn(q, k, v, topk_blocks, block_size, grad_out, chunked: bool) -> Callable[[], Any]:
    dtype = q.dtype
    batch, heads, num_queries, _ = q.shape
    chunk = num_queries
    if chunked:
        chunk = max(
            block_size, CHUNK_SCORE_ELEMENTS // (batch * heads * k.shape[2]) // block_size * block_size
        )

    def run(qf, kf, vf, start):
        return block_topk_attention_reference(
            qf[:, :, start : start + chunk], kf, vf, topk_blocks, block_size
        )

    def forward():
        with torch.no_grad():
            qf, kf, vf = (t.float() for t in (q, k, v))
            return torch.cat([run(qf, kf, vf, s) for s in range(0, num_queries, chunk)], dim=2).to(dtype)

    def forward_backward():
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        outs = [run(qf, kf, vf, s) for s in range(0, num_queries, chunk)]
        out = torch.cat(outs, dim=2)
        grads = torch.autograd.grad(out, (qf, kf, vf), grad_out.float())
        return tuple(t.to(dtype) for t in (out.detach(), *grads))

    return forward if grad_out is None else forward_backward


def _flex_fn(q, k, v, topk_blocks, block_size, grad_out) -> Callable[[], Any] | None:
    """FlexAttention over the same selected blocks (``None`` where it cannot run)."""
    if q.device.type != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    selected = block_selection_mask(q.float(), k.float(), topk_blocks, block_size, head_dim**-0.5)

    def mask_mod(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // block_size, kv_idx // block_size]

    block_mask = create_block_mask(mask_mod, batch, heads, num_queries, num_keys, device=q.device)
    compiled = torch.compile(flex_attention)
    return _op_fn(lambda a, b, c: compiled(a, b, c, block_mask=block_mask), q, k, v, grad_out)


def _mode(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def _label(q, backward: bool) -> str:
    batch, heads, num_queries, head_dim = q.shape
    dtype = str(q.dtype).removeprefix("torch.")
    return f"{_mode(backward)} {dtype} BH{batch * heads} N{num_queries} D{head_dim}"


def _block_case(q, k, v, topk_blocks, block_size, grad_out, device) -> BenchCase:
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    dense_fits = batch * heads * num_queries * num_keys <= DENSE_SCORE_LIMIT
    impls = {"reference": _reference_fn(q, k, v, topk_blocks, block_size, grad_out, not dense_fits)}
    notes = {"reference": "float32 math" + ("" if dense_fits else ", over query chunks")}
    for backend in OPS["block_topk_attention"].runnable(device)[1:]:
        impls[backend] = backend_impl(
            backend,
            _op_fn(lambda a, b, c: block_topk_attention(a, b, c, topk_blocks, block_size), q, k, v, grad_out),
        )
    peer = None
    flex = _flex_fn(q, k, v, topk_blocks, block_size, grad_out)
    if flex is not None:
        impls["flex"], peer = flex, "flex"
        notes["flex"] = (
            "FlexAttention (torch.compile) with the same selected blocks as mask_mod; mask not timed"
        )
    flops = OPS["block_topk_attention"].cost_of(q, k, v, topk_blocks, block_size).flops
    backward = grad_out is not None
    return BenchCase(
        op="block_topk_attention",
        label=f"{_label(q, backward)} blocks{topk_blocks}x{block_size}",
        impls=impls,
        flops=3 * flops if backward else flops,
        peer=peer,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes=notes,
    )


def _dense_case(q, k, v, grad_out, device) -> BenchCase:
    """Dense attention at the same size: the baseline the block cases are compared with."""
    from torch.nn.attention import SDPBackend

    flops = OPS["topk_attention"].cost_of(q, k, v, k.shape[2]).flops  # top-Nk attention is dense attention
    backward = grad_out is not None
    impls = {"reference": _op_fn(F.scaled_dot_product_attention, q, k, v, grad_out)}
    notes = {"reference": "sdpa: dense F.scaled_dot_product_attention (all Nk keys), the baseline"}
    if device.type == "cuda":
        impls["sdpa-flash"] = _sdpa_fn(q, k, v, grad_out, SDPBackend.FLASH_ATTENTION)
        impls["sdpa-mem-efficient"] = _sdpa_fn(q, k, v, grad_out, SDPBackend.EFFICIENT_ATTENTION)
    return BenchCase(
        op="block_topk_attention",
        label=f"{_label(q, backward)} dense",
        impls=impls,
        flops=3 * flops if backward else flops,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick or device.type != "cuda":
        sizes, dtype = [((1, 2), 128, 16)], torch.float32
        settings: Callable[[int], list[tuple[int, int]]] = lambda _length: [(2, 16)]  # noqa: E731
    else:
        sizes = [(BATCH_HEADS, n, d) for d in HEAD_DIMS for n in LENGTHS]
        dtype, settings = torch.bfloat16, _settings
    generator = torch.Generator(device="cpu").manual_seed(0)
    result = []
    for (batch, heads), length, head_dim in sizes:
        q, k, v, grad_out = attention_inputs((batch, heads, length, head_dim), generator, device, dtype)
        for backward in (False, True):
            g = grad_out if backward else None
            for topk_blocks, block_size in settings(length):
                result.append(
                    _add_memory_notes(_block_case(q, k, v, topk_blocks, block_size, g, device), device)
                )
            result.append(_add_memory_notes(_dense_case(q, k, v, g, device), device))
    return result
