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

Inputs are random normal (``attention_common.attention_inputs``: continuous, no quantization that
would inflate ties at the threshold); an implementation that rounds a near-tie of block scores
differently may select another block for a few query blocks, which the check allows for a small
share of rows. FlexAttention gets the selection computed by the definition beforehand, as a
``mask_mod`` over the selected blocks, with its block mask built once outside the timing at the
selection's block size (``BLOCK_SIZE=block_size``; the backward at 128 rows, the smallest its default
backward tiles accept, said in the row's note). Where the dense scores would not fit, the
reference runs over query chunks aligned to the blocks (the same math: each query block depends
on its own rows only).
Peak memory per implementation is noted on CUDA (first call), as in the topk_attention benchmark.

Causal cases (``causal=True``; pass label ``fwd-causal`` / ``fwd+bwd-causal``, so the crossover
lines pair them with the causal dense rows of the same size): D = 64, one setting per size, ``N / 8``
selected keys in blocks of 64 (2 blocks below N = 8192), against SDPA's own causal path
(``is_causal=True``, upper-left aligned like the op; flash and memory-efficient forced on CUDA),
whose FLOPs count the visible pairs, ``4 B H D sum_i min(i + 1, Nk)``. The op's causal FLOPs count
the keys its kernels score (each query's ``min(topk_blocks, I + 1)`` eligible blocks, the diagonal
one whole). No FlexAttention row for the causal cases (its block-mask helper has no in-block mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastvision.benchmark.attention_common import (
    MISMATCH_NOTE,
    MISMATCHED_ROWS,
    TOLERANCE,
    add_memory_notes,
    attention_inputs,
    dense_case,
    flex_block_fn,
    label,
    mode,
    op_fn,
)
from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.benchmark.timing import distribution_version
from fastvision.ops import OPS
from fastvision.ops.block_topk_attention import (
    block_selection_mask,
    block_topk_attention,
    block_topk_attention_reference,
)

BATCH_HEADS = (4, 8)
LENGTHS = (1024, 4096, 16384, 32768)
HEAD_DIMS = (64, 128)
CAUSAL_HEAD_DIMS = (64,)  # GPU time: the causal chunked reference costs as much as the full one
DENSE_SCORE_LIMIT = 1 << 31
CHUNK_SCORE_ELEMENTS = 1 << 28


def _settings(length: int) -> list[tuple[int, int]]:
    """(topk_blocks, block_size): 32 and 128 selected keys, and N / 8 (blocks of 64)."""
    settings = [(1, 32), (2, 64)]
    if length >= 8192:
        settings.append((length // 8 // 64, 64))
    return settings


def _causal_settings(length: int) -> list[tuple[int, int]]:
    """(topk_blocks, block_size) of the causal cases: N / 8 keys in blocks of 64 (2 blocks below 8K)."""
    return [(length // 8 // 64, 64)] if length >= 8192 else [(2, 64)]


def _causal_label(q: torch.Tensor, backward: bool) -> str:
    pass_, rest = label(q, backward).split(" ", 1)
    return f"{pass_}-causal {rest}"


def _causal_chunk(qf, kf, vf, selected, start, chunk, block_size, scale):
    """The causal definition for queries ``[start, start + chunk)`` over the whole-sequence selection
    ``selected`` (query positions keep their offset: key ``j`` visible to query ``i`` iff ``j <= i``)."""
    rows = torch.arange(start, min(start + chunk, qf.shape[2]), device=qf.device)
    cols = torch.arange(kf.shape[2], device=qf.device)
    mask = selected[:, :, rows // block_size][..., cols // block_size] & (cols[None, :] <= rows[:, None])
    scores = (qf[:, :, rows] @ kf.transpose(-2, -1)) * scale
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vf


def _causal_reference_fn(q, k, v, topk_blocks, block_size, grad_out, chunked: bool) -> Callable[[], Any]:
    """``block_topk_attention_reference(..., causal=True)``, over query chunks where the dense scores
    would not fit (the selection is computed once, on the whole sequence, inside the timing)."""
    dtype = q.dtype
    batch, heads, num_queries, head_dim = q.shape
    scale = head_dim**-0.5
    if not chunked:
        return _reference_fn(q, k, v, topk_blocks, block_size, grad_out, False, causal=True)
    chunk = max(block_size, CHUNK_SCORE_ELEMENTS // (batch * heads * k.shape[2]) // block_size * block_size)

    def run(qf, kf, vf):
        selected = block_selection_mask(qf.detach(), kf.detach(), topk_blocks, block_size, scale, causal=True)
        starts = range(0, num_queries, chunk)
        parts = [_causal_chunk(qf, kf, vf, selected, s, chunk, block_size, scale) for s in starts]
        return torch.cat(parts, dim=2)

    def forward():
        with torch.no_grad():
            return run(*(t.float() for t in (q, k, v))).to(dtype)

    def forward_backward():
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        out = run(qf, kf, vf)
        grads = torch.autograd.grad(out, (qf, kf, vf), grad_out.float())
        return tuple(t.to(dtype) for t in (out.detach(), *grads))

    return forward if grad_out is None else forward_backward


def _reference_fn(
    q, k, v, topk_blocks, block_size, grad_out, chunked: bool, causal: bool = False
) -> Callable[[], Any]:
    dtype = q.dtype
    batch, heads, num_queries, _ = q.shape
    chunk = num_queries
    if chunked:
        chunk = max(
            block_size, CHUNK_SCORE_ELEMENTS // (batch * heads * k.shape[2]) // block_size * block_size
        )

    def run(qf, kf, vf, start):
        return block_topk_attention_reference(
            qf[:, :, start : start + chunk], kf, vf, topk_blocks, block_size, None, causal
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


def _flex_fn(q, k, v, topk_blocks, block_size, grad_out) -> tuple[Callable[[], Any], str] | None:
    """FlexAttention over the same selected blocks (``None`` where it cannot run)."""
    if q.device.type != "cuda":
        return None
    head_dim = q.shape[-1]
    selected = block_selection_mask(q.float(), k.float(), topk_blocks, block_size, head_dim**-0.5)
    return flex_block_fn(q, k, v, grad_out, selected, block_size)


def _block_case(q, k, v, topk_blocks, block_size, grad_out, device, causal: bool = False) -> BenchCase:
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    dense_fits = batch * heads * num_queries * num_keys <= DENSE_SCORE_LIMIT
    if causal:
        reference = _causal_reference_fn(q, k, v, topk_blocks, block_size, grad_out, not dense_fits)
    else:
        reference = _reference_fn(q, k, v, topk_blocks, block_size, grad_out, not dense_fits)
    impls = {"reference": reference}
    notes = {"reference": "float32 math" + ("" if dense_fits else ", over query chunks")}
    for backend in OPS["block_topk_attention"].runnable(device)[1:]:
        impls[backend] = backend_impl(
            backend,
            op_fn(
                lambda a, b, c: block_topk_attention(a, b, c, topk_blocks, block_size, causal=causal),
                q,
                k,
                v,
                grad_out,
            ),  # fmt: skip
        )
        notes[backend] = MISMATCH_NOTE
    peer = None
    flex = None if causal else _flex_fn(q, k, v, topk_blocks, block_size, grad_out)
    if flex is not None:
        (impls["flex"], notes["flex"]), peer = flex, "flex"
    cost = OPS["block_topk_attention"].cost_of(q, k, v, topk_blocks, block_size, causal=causal)
    flops = cost.flops
    backward = grad_out is not None
    # Issue term of the cost model: the forward's flash loop scores every selected query-key pair.
    pairs = flops // (4 * batch * heads * head_dim) if causal else num_queries * topk_blocks * block_size
    scores = {"_block_attention_forward_kernel": batch * heads * pairs}
    name = _causal_label(q, backward) if causal else label(q, backward)
    return BenchCase(
        op="block_topk_attention",
        label=f"{name} blocks{topk_blocks}x{block_size}",
        impls=impls,
        flops=3 * flops if backward else flops,
        # The backward reads q, k, v, out and its gradient and writes dq, dk, dv: 2x the forward's bytes.
        bytes_moved=3 * cost.bytes_moved if backward else cost.bytes_moved,
        peer=peer,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes=notes,
        max_mismatched_rows=MISMATCHED_ROWS,
        hot_loop_scores=scores,
    )


def _causal_dense_case(q, k, v, grad_out, device: torch.device) -> BenchCase:
    """SDPA's own causal path at the same size (``is_causal=True``; flash and memory-efficient forced
    on CUDA): the baseline of the causal cases. FLOPs over the visible pairs only."""
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    visible = min(num_queries, num_keys)
    pairs = visible * (visible + 1) // 2 + max(0, num_queries - num_keys) * num_keys
    flops = 4 * batch * heads * pairs * head_dim
    moved = OPS["topk_attention"].cost_of(q, k, v, num_keys).bytes_moved
    backward = grad_out is not None

    def causal_sdpa(backend=None):
        def attention(a, b, c):
            if backend is None:
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)

        return op_fn(attention, q, k, v, grad_out)

    impls = {"reference": causal_sdpa()}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        impls["sdpa-flash"] = causal_sdpa(SDPBackend.FLASH_ATTENTION)
        impls["sdpa-mem-efficient"] = causal_sdpa(SDPBackend.EFFICIENT_ATTENTION)
    return BenchCase(
        op="block_topk_attention",
        label=f"{_causal_label(q, backward)} dense",
        impls=impls,
        flops=3 * flops if backward else flops,
        bytes_moved=3 * moved if backward else moved,
        dtype=q.dtype,
        tolerance=TOLERANCE[q.dtype],
        notes={"reference": "SDPA's causal path (is_causal=True): the baseline"},
        baselines=tuple(name for name in impls if name != "reference"),
        flop_class="wgmma" if q.dtype in (torch.float16, torch.bfloat16) else "cuda_core",
    )


# Attention over given blocks, grouped-query layout (the native-sparse-attention peers' setting):
# (batch, query heads, key/value heads, N, D), selected blocks per query, block size.
GIVEN_BLOCKS_SHAPE = (1, 32, 2, 16384, 128)
GIVEN_BLOCKS_SELECTED, GIVEN_BLOCKS_SIZE = 16, 64


def _fla_nsa():
    """fla-core's ``ParallelNSAFunction`` (native sparse attention's selection branch) when it imports."""
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except Exception:  # noqa: BLE001  (absent, or a version that does not import with this torch/triton)
        return None
    return ParallelNSAFunction


def _given_blocks_reference(q, k_kv, v_kv, selected, group, block_size, scale, grad_out):
    """The causal definition over the selection mask ``selected`` ``[B, HQ, Nqb, Nkb]`` in float32,
    key/value heads shared by ``group`` query heads, over query chunks; with ``grad_out``, (out, dq,
    dk, dv) with dk and dv of the shared heads, each chunk differentiated on its own (no Nq x Nk
    graph is kept)."""
    batch, heads, num_queries, _ = q.shape
    chunk = max(
        block_size, CHUNK_SCORE_ELEMENTS // (batch * heads * k_kv.shape[2]) // block_size * block_size
    )

    def run():
        qf, kf, vf = (t.detach().float().requires_grad_(grad_out is not None) for t in (q, k_kv, v_kv))
        outs, grads = [], [torch.zeros_like(t) for t in (qf, kf, vf)]
        for start in range(0, num_queries, chunk):
            with torch.set_grad_enabled(grad_out is not None):
                k_all, v_all = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
                out = _causal_chunk(qf, k_all, v_all, selected, start, chunk, block_size, scale)
                if grad_out is not None:
                    g = grad_out[:, :, start : start + chunk].float()
                    for total, part in zip(grads, torch.autograd.grad(out, (qf, kf, vf), g), strict=True):
                        total += part
            outs.append(out.detach())
        out = torch.cat(outs, dim=2).to(q.dtype)
        return out if grad_out is None else (out, *(t.to(q.dtype) for t in grads))

    return run


def _given_blocks_cases(device: torch.device) -> list[BenchCase]:
    """Causal attention over given blocks, grouped-query: the attention kernels alone (selection done
    before timing), ours against fla-core's native-sparse-attention selection branch
    (``ParallelNSAFunction``) where it imports, on the same selected blocks: each key/value head's
    selection (made by the group's first query head) is shared by its ``HQ / H = 16`` query heads, as
    that kernel requires. Ours has no grouped-query form: it reads K and V expanded to every query
    head (expanded before timing; its dk, dv are summed over the group when checked)."""
    from fastvision.triton_kernels.block_topk_attention import (
        block_attention_forward,
        block_topk_attention_backward,
    )

    batch, heads, kv_heads, length, head_dim = GIVEN_BLOCKS_SHAPE
    selected_blocks, block_size = GIVEN_BLOCKS_SELECTED, GIVEN_BLOCKS_SIZE
    group, scale = heads // kv_heads, head_dim**-0.5
    generator = torch.Generator(device="cpu").manual_seed(5)
    dtype = torch.bfloat16
    q, _, _, grad_out = attention_inputs((batch, heads, length, head_dim), generator, device, dtype)
    _, k_kv, v_kv, _ = attention_inputs((batch, kv_heads, length, head_dim), generator, device, dtype)
    k, v = k_kv.repeat_interleave(group, 1).contiguous(), v_kv.repeat_interleave(group, 1).contiguous()
    # The definition's causal selection per key/value head; where fewer than S blocks are eligible,
    # the remaining picks are later blocks, which the causal mask hides from every query of the block.
    kv_mask = block_selection_mask(
        q[:, ::group].float(), k_kv.float(), selected_blocks, block_size, scale, True
    )
    kv_indices = kv_mask.to(torch.int8).topk(selected_blocks, dim=-1).indices.to(torch.int32)
    indices = kv_indices.repeat_interleave(group, 1).contiguous()
    num_blocks = -(-length // block_size)
    selected = torch.zeros((batch, heads, num_blocks, num_blocks), dtype=torch.bool, device=device)
    selected.scatter_(-1, indices.long(), True)
    # FLOPs as the op counts its causal work (each query block's eligible selected blocks, the
    # diagonal one whole): shapes only.
    flops = OPS["block_topk_attention"].cost_of(q, k, v, selected_blocks, block_size, causal=True).flops
    element = q.element_size()
    moved = 2 * q.numel() * element + 2 * k_kv.numel() * element + indices.numel() * 4
    nsa = _fla_nsa()
    fla_inputs = [t.transpose(1, 2).contiguous() for t in (q, k_kv, v_kv)]  # [B, N, heads, D]
    token_indices = kv_indices.permute(0, 2, 1, 3).repeat_interleave(block_size, 1)[:, :length].long()
    token_indices = token_indices.contiguous()  # [B, N, kv heads, S]
    notes = {
        "reference": "float32 causal definition over the given blocks, over query chunks",
        "triton": "block_attention_forward (+ block_topk_attention_backward) over the given blocks, "
        "K and V expanded to the 32 query heads",
    }
    if nsa is not None:
        notes["fla"] = (
            f"fla-core {distribution_version('fla-core')} ParallelNSAFunction over the same blocks "
            "(16 query heads per key/value head, [B, N, H, D] layout; layout changes made before timing)"
        )

    def build(backward: bool) -> BenchCase:
        g = grad_out if backward else None
        impls = {"reference": _given_blocks_reference(q, k_kv, v_kv, selected, group, block_size, scale, g)}
        adapt = {}
        if backward:
            leaves = [t.detach().requires_grad_(True) for t in fla_inputs]
            fla_grad = grad_out.transpose(1, 2).contiguous()

            def ours():
                out, lse = block_attention_forward(q, k, v, indices, block_size, scale, causal=True)
                grads = block_topk_attention_backward(
                    grad_out, q, k, v, out, lse, indices, block_size, scale, True
                )
                return out, *grads

            def fla():
                out = nsa.apply(*leaves, token_indices, selected_blocks, block_size, scale, None)
                return out, *torch.autograd.grad(out, leaves, fla_grad)

            def per_kv_head(t):
                return t.view(batch, kv_heads, group, length, head_dim).sum(2)

            adapt["triton"] = lambda o: (o[0], o[1], per_kv_head(o[2]), per_kv_head(o[3]))
            adapt["fla"] = lambda o: tuple(t.transpose(1, 2) for t in o)
        else:

            def ours():
                return block_attention_forward(q, k, v, indices, block_size, scale, causal=True)[0]

            def fla():
                with torch.no_grad():
                    return nsa.apply(*fla_inputs, token_indices, selected_blocks, block_size, scale, None)

            adapt["fla"] = lambda o: o.transpose(1, 2)
        impls["triton"] = ours
        if nsa is not None:
            impls["fla"] = fla
        shape = f"B{batch} HQ{heads} HKV{kv_heads} N{length} D{head_dim}"
        return BenchCase(
            op="block_topk_attention",
            label=f"{mode(backward)}-causal given blocks bf16 {shape} blocks{selected_blocks}x{block_size}",
            impls=impls,
            flops=3 * flops if backward else flops,
            bytes_moved=3 * moved if backward else moved,
            peer="fla" if nsa is not None else None,
            dtype=dtype,
            tolerance=TOLERANCE[dtype],
            notes=dict(notes),
            adapt=adapt,
        )

    return [build(False), build(True)]


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick or device.type != "cuda":
        sizes, dtype = [((1, 2), 128, 16)], torch.float32
        settings: Callable[[int], list[tuple[int, int]]] = lambda _length: [(2, 16)]  # noqa: E731
        causal_settings: Callable[[int], list[tuple[int, int]]] = lambda _length: [(2, 16)]  # noqa: E731
    else:
        sizes = [(BATCH_HEADS, n, d) for d in HEAD_DIMS for n in LENGTHS]
        dtype, settings, causal_settings = torch.bfloat16, _settings, _causal_settings
    generator = torch.Generator(device="cpu").manual_seed(0)
    result = []
    for (batch, heads), length, head_dim in sizes:
        q, k, v, grad_out = attention_inputs((batch, heads, length, head_dim), generator, device, dtype)
        for backward in (False, True):
            g = grad_out if backward else None
            for topk_blocks, block_size in settings(length):
                result.append(
                    add_memory_notes(_block_case(q, k, v, topk_blocks, block_size, g, device), device)
                )
            result.append(add_memory_notes(dense_case("block_topk_attention", q, k, v, g, device), device))
            causal = causal_settings(length) if head_dim in CAUSAL_HEAD_DIMS or quick else []
            for topk_blocks, block_size in causal:
                case = _block_case(q, k, v, topk_blocks, block_size, g, device, causal=True)
                result.append(add_memory_notes(case, device))
            if causal:
                result.append(add_memory_notes(_causal_dense_case(q, k, v, g, device), device))
    if device.type == "cuda" and not quick:
        result.extend(add_memory_notes(case, device) for case in _given_blocks_cases(device))
    return result
