"""Block top-k sparse attention in Triton: block means, block selection, and flash attention over the
selected key blocks only.

Rows of q and of k are cut into consecutive blocks of ``BLOCK_SIZE`` rows (the last one partial).
Query block ``I`` attends, with one softmax, to every key of the ``topk_blocks`` key blocks ``J`` of
largest block score ``scale * mean(q[I]) . mean(k[J])`` (ties: the lower ``J``).

Forward (``block_topk_attention_forward``):

1. ``_block_means_kernel`` (one program per (batch, head, block)): float32 means of the rows of each
   block of q and of k, ``[B, H, ceil(N / BLOCK_SIZE), D]``.
2. Block selection: the token top-k selection kernel of ``topk_attention``
   (``_select_topk_kernel``: IEEE float32 ``tl.dot`` scores, an int64 key per score packing the
   order-preserving float bits with ``2**32 - 1 - index``, bitonic merges) run on the block means,
   so block selection has exactly the tie rule of the token op. Output: the selected key blocks of
   every query block, ``[B, H, Nqb, topk_blocks]`` int32, best first. Its cost is that of a token
   selection over ``Nq / BLOCK_SIZE`` queries and ``Nk / BLOCK_SIZE`` keys: ``BLOCK_SIZE**2`` times
   less than token selection.
3. ``_block_attention_forward_kernel`` (one program per ``BLOCK_M`` queries, all in one query
   block): an online-softmax loop over the selected key blocks, ``BLOCK_N`` keys per ``tl.dot``
   step (tensor cores for 16-bit inputs, IEEE float32 products for float32 ones), writing the
   output and the log-sum-exp. Cost ``4 Nq topk_blocks BLOCK_SIZE D`` FLOPs. Base 2: the scores are
   ``|scale| log2(e) q . k`` (a negative scale negates q, exactly), so each probability is one FFMA
   and one MUFU.EX2; the key mask is applied only to steps that can cut a key (the last key block;
   causal, the diagonal block).

``topk_blocks >= Nkb`` is dense attention: no selection; the same kernels walk every block.

Causal (``CAUSAL``; SDPA's upper-left alignment, key ``j`` visible to query ``i`` iff ``j <= i``):
the selection runs in torch on the block means (``_select_blocks_causal``: ``Nqb x Nkb`` scores,
blocks after the query block at ``-inf``, the packed-key top-k of the token kernel, so the same tie
rule), eligible blocks first; the forward and dq loops take the first ``min(S, I + 1)`` entries of
query block ``I``, dense causal the blocks ``0..I``, dk/dv (dense) the query blocks from its own on;
every kernel applies ``j <= i``.

Backward (``block_topk_attention_backward``), without atomics, so every run gives the same bits:

- ``delta = rowsum(dO * O)`` (torch, float32).
- ``_block_attention_dq_kernel``: query-major, the forward's loop again: dq.
- ``_block_attention_dkdv_kernel``: key-major. A key-block -> query-block map is built from the saved
  selection (``block_map``, the counting sort ``selection_map`` of topk_attention: counts per key
  block, offsets by a prefix sum, the query blocks of each key block in increasing order). Each
  program owns ``BLOCK_N`` keys of one key block and loops over the query blocks that selected it
  in that fixed order, accumulating dk and dv in registers: each key row is written once, by one
  program.

Grids are one axis (``B * H * tiles`` programs; axis 0 takes ``2**31 - 1``). Kernels import nothing
from the package API.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature
from fastvision.triton_kernels.topk_attention import (
    _select_topk_kernel,
    _selection_constexprs,
    select_topk,
    selection_map,
    selection_tile,
)

BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_PROGRAMS = 2**31 - 1
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Scores one program handles per iteration of its main loop (bench/kernel_budget.py: SASS per score).
SASS_LOOP_WORK = {
    "_block_attention_forward_kernel": lambda constexprs: constexprs["BLOCK_M"] * constexprs["BLOCK_N"],
}

# sm_90, checked by compiling launch_configs(): the means, selection and dq kernels spill nothing.
# The forward (16-bit D = 128 with blocks of 32; float32 D = 32 with blocks of 128) keeps one 8-byte
# value in local memory; dk/dv at 255 registers (two [BLOCK_N, D] float32 accumulators beside the
# K and V tiles, at D = 128, or D = 32 with blocks of 128) keeps up to three.
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "_block_attention_forward_kernel": SpillAllowance(
        8, "one 8-byte stack slot: 2 LDL/STL in about 1,700-2,000 SASS instructions (budget table)"
    ),
    "_block_attention_dkdv_kernel": SpillAllowance(
        24,
        "up to three 8-byte stack slots at 255 registers: at most 13 LDL/STL in about 1,700-2,500 SASS "
        "instructions (budget table); the accumulators and tl.dot operands stay in registers",
    ),
}


@triton.jit
def _block_means_kernel(
    x_ptr, out_ptr, num_rows, num_blocks, heads,
    stride_b, stride_h, stride_n, stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0) // num_blocks
    block = tl.program_id(0) % num_blocks
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    rows = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_rows
    offsets = (
        batch * stride_b + head * stride_h + rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d
    )
    x = tl.load(x_ptr + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
    count = tl.minimum(num_rows - block * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    tl.store(out_ptr + (pid_bh.to(tl.int64) * num_blocks + block) * HEAD_DIM + dims, mean)


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_rows(base, rows, row_ok, dims, stride_n, stride_d, UPCAST: tl.constexpr):
    """``[len(rows), D]`` tile (zeros where not ``row_ok``), float32 when ``UPCAST``."""
    x = tl.load(base + rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d,
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_cols(base, rows, row_ok, dims, stride_n, stride_d, UPCAST: tl.constexpr):
    """``[D, len(rows)]`` transposed tile (zeros where not ``row_ok``), float32 when ``UPCAST``."""
    x = tl.load(base + rows.to(tl.int64)[None, :] * stride_n + dims[:, None] * stride_d,
                mask=row_ok[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _block_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
    num_queries, num_keys, num_selected, heads, qk_scale, negate,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    DENSE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
):  # fmt: skip
    """``qk_scale = |scale| * log2(e)`` (> 0); ``negate``: the scale is negative, so the kernel works
    on ``-q`` (exact) and every score is ``qk_scale * q' . k`` in base 2: one FFMA and one MUFU.EX2
    per probability."""
    query_tiles = tl.cdiv(num_queries, BLOCK_M)
    pid_bh = tl.program_id(0) // query_tiles
    pid_m = tl.program_id(0) % query_tiles
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    query_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    idx_base = idx_ptr + (pid_bh.to(tl.int64) * tl.cdiv(num_queries, BLOCK_SIZE) + query_block) * num_selected
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    q = _load_rows(q_ptr + batch * stride_qb + head * stride_qh, rows, row_ok, dims, stride_qn, stride_qd,
                   UPCAST)  # fmt: skip
    if negate != 0:
        q = -q

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Causal: the selected blocks are best first and the ineligible ones (after this query block)
    # come last, so the first min(S, I + 1) of them are the eligible ones.
    num_blocks = num_selected
    if CAUSAL:
        num_blocks = tl.minimum(num_selected, query_block + 1)
    # One runtime loop over (selected block, BLOCK_N keys of it): no unrolled copies of the body.
    for step in range(0, num_blocks * (BLOCK_SIZE // BLOCK_N)):
        if DENSE:
            key_block = step // (BLOCK_SIZE // BLOCK_N)
        else:
            key_block = tl.load(idx_base + step // (BLOCK_SIZE // BLOCK_N))
        keys = key_block * BLOCK_SIZE + (step % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + cols
        key_ok = keys < num_keys
        k_cols = _load_cols(k_base, keys, key_ok, dims, stride_kn, stride_kd, UPCAST)
        qk = _dot(q, k_cols, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE_FP32)
        # Masks only where a key may be cut: past Nk (the last key block) or, causal, the diagonal block.
        cut = key_block * BLOCK_SIZE + BLOCK_SIZE > num_keys
        if CAUSAL:
            if cut | (key_block == query_block):
                qk = tl.where(key_ok[None, :] & (keys[None, :] <= rows[:, None]), qk, float("-inf"))
        else:
            if cut:
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
        # Key 0 of a selected block exists and, causal, is at or before every query of the block:
        # the running max is finite after the first step.
        new_max = tl.maximum(row_max, tl.max(qk, axis=1) * qk_scale)
        rescale = tl.math.exp2(row_max - new_max)
        probs = tl.math.exp2(qk * qk_scale - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        v_rows = _load_rows(v_base, keys, key_ok, dims, stride_vn, stride_vd, UPCAST)
        acc = _dot(probs.to(v_rows.dtype), v_rows, acc * rescale[:, None], IEEE_FP32)
        row_max = new_max

    out = acc / row_sum[:, None]
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453  # natural log
    out_offsets = pid_bh.to(tl.int64) * num_queries * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM
    tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * num_queries + rows, lse, mask=row_ok)


@triton.jit
def _block_attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, idx_ptr, dq_ptr,
    num_queries, num_keys, num_selected, heads, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    DENSE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
):  # fmt: skip
    query_tiles = tl.cdiv(num_queries, BLOCK_M)
    pid_bh = tl.program_id(0) // query_tiles
    pid_m = tl.program_id(0) % query_tiles
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    query_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    idx_base = idx_ptr + (pid_bh.to(tl.int64) * tl.cdiv(num_queries, BLOCK_SIZE) + query_block) * num_selected
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    q = _load_rows(q_ptr + batch * stride_qb + head * stride_qh, rows, row_ok, dims, stride_qn, stride_qd,
                   UPCAST)  # fmt: skip
    grad_out = _load_rows(grad_out_ptr + batch * stride_gb + head * stride_gh, rows, row_ok, dims,
                          stride_gn, stride_gd, UPCAST)  # fmt: skip
    row_base = pid_bh.to(tl.int64) * num_queries
    # Base 2: p = exp2(qk * scale * log2(e) - lse * log2(e)), one FFMA and one MUFU.EX2.
    qk_scale = scale * 1.4426950408889634
    lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    num_blocks = num_selected
    if CAUSAL:
        num_blocks = tl.minimum(num_selected, query_block + 1)
    # One runtime loop over (selected block, BLOCK_N keys of it): no unrolled copies of the body.
    for step in range(0, num_blocks * (BLOCK_SIZE // BLOCK_N)):
        if DENSE:
            key_block = step // (BLOCK_SIZE // BLOCK_N)
        else:
            key_block = tl.load(idx_base + step // (BLOCK_SIZE // BLOCK_N))
        keys = key_block * BLOCK_SIZE + (step % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + cols
        key_ok = keys < num_keys
        k_cols = _load_cols(k_base, keys, key_ok, dims, stride_kn, stride_kd, UPCAST)
        v_cols = _load_cols(v_base, keys, key_ok, dims, stride_vn, stride_vd, UPCAST)
        qk = _dot(q, k_cols, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE_FP32)
        probs = tl.math.exp2(qk * qk_scale - lse[:, None])
        # Masks only where a key may be cut: past Nk (the last key block) or, causal, the diagonal block.
        cut = key_block * BLOCK_SIZE + BLOCK_SIZE > num_keys
        if CAUSAL:
            if cut | (key_block == query_block):
                probs = tl.where(key_ok[None, :] & (keys[None, :] <= rows[:, None]), probs, 0.0)
        else:
            if cut:
                probs = tl.where(key_ok[None, :], probs, 0.0)
        grad_probs = _dot(grad_out, v_cols, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE_FP32)
        grad_scores = probs * (grad_probs - delta[:, None])
        dq = _dot(grad_scores.to(k_cols.dtype), tl.trans(k_cols), dq, IEEE_FP32)

    out_offsets = row_base * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dq_ptr + out_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _block_attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, offsets_ptr, qlist_ptr, dk_ptr, dv_ptr,
    num_queries, num_keys, heads, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    DENSE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
):  # fmt: skip
    key_tiles = tl.cdiv(num_keys, BLOCK_N)
    pid_bh = tl.program_id(0) // key_tiles
    pid_n = tl.program_id(0) % key_tiles
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < num_keys
    dims = tl.arange(0, HEAD_DIM)
    row_range = tl.arange(0, BLOCK_M)
    key_block = (pid_n * BLOCK_N) // BLOCK_SIZE
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    g_base = grad_out_ptr + batch * stride_gb + head * stride_gh
    row_base = pid_bh.to(tl.int64) * num_queries
    qk_scale = scale * 1.4426950408889634
    k = _load_rows(k_ptr + batch * stride_kb + head * stride_kh, keys, key_ok, dims, stride_kn, stride_kd,
                   UPCAST)  # fmt: skip
    v = _load_rows(v_ptr + batch * stride_vb + head * stride_vh, keys, key_ok, dims, stride_vn, stride_vd,
                   UPCAST)  # fmt: skip

    if DENSE:
        # Causal: query blocks before this key block see none of its keys.
        start = key_block if CAUSAL else 0
        end = tl.cdiv(num_queries, BLOCK_SIZE)
    else:
        entry = pid_bh.to(tl.int64) * tl.cdiv(num_keys, BLOCK_SIZE) + key_block
        start = tl.load(offsets_ptr + entry)
        end = tl.load(offsets_ptr + entry + 1)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # One runtime loop over (query block, BLOCK_M rows of it): no unrolled copies of the body.
    for step in range(start * (BLOCK_SIZE // BLOCK_M), end * (BLOCK_SIZE // BLOCK_M)):
        if DENSE:
            query_block = step // (BLOCK_SIZE // BLOCK_M)
        else:
            query_block = tl.load(qlist_ptr + step // (BLOCK_SIZE // BLOCK_M))
        rows = query_block * BLOCK_SIZE + (step % (BLOCK_SIZE // BLOCK_M)) * BLOCK_M + row_range
        row_ok = rows < num_queries
        q_cols = _load_cols(q_base, rows, row_ok, dims, stride_qn, stride_qd, UPCAST)
        grad_out = _load_rows(g_base, rows, row_ok, dims, stride_gn, stride_gd, UPCAST)
        lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
        qk = _dot(k, q_cols, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE_FP32)  # [N, M]
        probs = tl.math.exp2(qk * qk_scale - lse[None, :])
        # No mask for rows past Nq (zero q, dO and delta: no contribution) or keys past Nk (their rows
        # are never stored); causal: query blocks up to this key block (the diagonal, and entries past
        # a query block's eligible ones) see keys j <= i only.
        if CAUSAL:  # noqa: SIM102  (a constexpr, then a runtime condition)
            if query_block <= key_block:
                probs = tl.where(keys[:, None] <= rows[None, :], probs, 0.0)
        dv = _dot(probs.to(grad_out.dtype), grad_out, dv, IEEE_FP32)
        grad_probs = _dot(v, tl.trans(grad_out), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE_FP32)
        grad_scores = probs * (grad_probs - delta[None, :])
        dk = _dot(grad_scores.to(q_cols.dtype), tl.trans(q_cols), dk, IEEE_FP32)

    out_offsets = (
        pid_bh.to(tl.int64) * num_keys * HEAD_DIM + keys.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :]
    )
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


# --- tile choice and grids (shared by the launchers and launch_configs) -------------------------------

KERNELS = ("forward", "dq", "dkdv")


@dataclass(frozen=True)
class Tile:
    block_m: int  # queries per program (forward, dq) or per inner step (dk/dv); divides BLOCK_SIZE
    block_n: int  # keys per inner step (forward, dq) or per program (dk/dv); divides BLOCK_SIZE
    num_warps: int
    num_stages: int = 2


def attention_tile(
    block_size: int, head_dim: int, dtype: torch.dtype, kernel: str = "forward", interpret: bool = False
) -> Tile:
    """Tile of the attention kernel ``kernel`` (``forward``, ``dq`` or ``dkdv``). Both sides divide
    ``block_size`` so that a program's queries lie in one query block and each step's keys in one
    key block.

    16-bit inputs (tensor cores; wgmma needs a dot's M, the program's own rows, to be >= 64):

    - forward: ``min(128, block_size)`` queries per program, one warpgroup per 64 of them, one key
      block per step (each selected index read once per query tile; sm_90 budget: wgmma, no spills);
    - dq: 64 queries per program over key steps of 64 (32 at D = 128);
    - dk/dv: one program per key block, ``block_size`` keys (one or two warpgroups), over query
      steps of 64 (32 where the two ``[block_size, D]`` float32 accumulators need the registers).

    Float32 inputs use IEEE products on CUDA cores, whose ``tl.dot`` keeps operands in registers:
    16 x 16 tiles (32 x 32 in the forward at D <= 32). Blocks of 16 and 32 rows give smaller tiles
    (mma.sync): correct, not the fast path.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if interpret:  # the interpreter amortizes its per-program cost on big tiles
        return Tile(block_size, block_size, 4)
    if dtype == torch.float32:
        block_m = block_n = 32 if head_dim <= 32 and kernel == "forward" else 16
    elif kernel == "forward":
        block_m, block_n = 128, 128
    elif kernel == "dq":
        block_m, block_n = 64, (64 if head_dim <= 64 else 32)
    else:
        block_n = block_size
        block_m = 64 if head_dim <= 64 and block_size <= 64 else 32
    block_m, block_n = min(block_m, block_size), min(block_n, block_size)
    own = block_n if kernel == "dkdv" else block_m
    if kernel == "forward" and dtype != torch.float32:
        num_warps = 8 if own >= 128 else 4  # one warpgroup per 64 query rows
    else:
        num_warps = 8 if own >= 128 or own * head_dim >= 8192 else 4
    return Tile(block_m, block_n, num_warps)


def means_warps(block_size: int, head_dim: int) -> int:
    """Warps of the block-means kernel: 8 for tiles of 8192 values or more (64 float32 per thread)."""
    return 8 if block_size * head_dim >= 8192 else 4


def _grid(batch: int, heads: int, rows: int, tile_rows: int) -> tuple[int]:
    programs = batch * heads * triton.cdiv(rows, tile_rows)
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"block_topk_attention: B * H * ceil(N / {tile_rows}) = {programs} programs exceed the grid "
            f"limit {MAX_PROGRAMS}"
        )
    return (programs,)


def block_means_grid(batch: int, heads: int, num_rows: int, block_size: int) -> tuple[int]:
    """``B * H * ceil(N / block_size)`` programs on axis 0: one per block."""
    return _grid(batch, heads, num_rows, block_size)


def forward_grid(
    batch: int, heads: int, num_queries: int, block_size: int, head_dim: int, dtype: torch.dtype,
    interpret: bool = False,
) -> tuple[int]:  # fmt: skip
    """Forward: ``B * H * ceil(Nq / BLOCK_M)`` programs on axis 0."""
    tile = attention_tile(block_size, head_dim, dtype, "forward", interpret)
    return _grid(batch, heads, num_queries, tile.block_m)


def dq_grid(
    batch: int, heads: int, num_queries: int, block_size: int, head_dim: int, dtype: torch.dtype,
    interpret: bool = False,
) -> tuple[int]:  # fmt: skip
    """dq: ``B * H * ceil(Nq / BLOCK_M)`` programs on axis 0."""
    tile = attention_tile(block_size, head_dim, dtype, "dq", interpret)
    return _grid(batch, heads, num_queries, tile.block_m)


def dkdv_grid(
    batch: int, heads: int, num_keys: int, block_size: int, head_dim: int, dtype: torch.dtype,
    interpret: bool = False,
) -> tuple[int]:  # fmt: skip
    """dk/dv: ``B * H * ceil(Nk / BLOCK_N)`` programs on axis 0 (on a GPU, 16-bit: one per key block)."""
    tile = attention_tile(block_size, head_dim, dtype, "dkdv", interpret)
    return _grid(batch, heads, num_keys, tile.block_n)


# --- launchers --------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
# The forward's base-2 score scale is |scale| * log2(e), at least this: a zero scale runs as 1e-30
# (every score below 1e-30 * |q . k|, a uniform softmax to float32 precision) so that masked
# scores stay -inf instead of 0 * -inf.
MIN_QK_SCALE = 1e-30 * LOG2E
_SELECTION_CHUNK = 1 << 24  # block scores formed at a time by the causal selection


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and interpreting()


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, ceil(N / block_size), D]`` float32 means of consecutive row blocks (last one partial)."""
    batch, heads, num_rows, head_dim = x.shape
    num_blocks = triton.cdiv(num_rows, block_size)
    means = torch.empty((batch, heads, num_blocks, head_dim), dtype=torch.float32, device=x.device)
    if means.numel() == 0:
        return means
    _block_means_kernel[block_means_grid(batch, heads, num_rows, block_size)](
        x, means, num_rows, num_blocks, heads, *_strides(x), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        num_warps=means_warps(block_size, head_dim),
    )  # fmt: skip
    return means


_LOW_WORD = 4294967295  # 2**32 - 1: the block-index word of a packed key


def _pack_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score, -block index) for a ``[..., Nkb]`` float32 score tensor: the
    packing of the token selection kernel, so ties go to the lower block."""
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)  # -0.0 and +0.0 are one score
    bits = scores.view(torch.int32).to(torch.int64)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    index = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return (ordered << 32) + (_LOW_WORD - index)


def _select_blocks_causal(
    q_means: torch.Tensor, k_means: torch.Tensor, topk_blocks: int, scale: float
) -> torch.Tensor:
    """Causal block selection on the block means (torch; ``Nqb x Nkb`` scores, ``block_size**2``
    times fewer than the attention's): key blocks after the query block score ``-inf``, so they rank
    after every eligible block (the attention kernels use the first ``min(S, I + 1)`` entries of
    query block ``I``; later entries name blocks the in-block mask would remove anyway)."""
    batch, heads, num_query_blocks, _ = q_means.shape
    num_key_blocks = k_means.shape[2]
    indices = torch.empty(
        (batch, heads, num_query_blocks, topk_blocks), dtype=torch.int32, device=q_means.device
    )
    key_blocks = torch.arange(num_key_blocks, device=q_means.device)
    keys_t = k_means.transpose(-2, -1)
    chunk = max(1, _SELECTION_CHUNK // max(1, batch * heads * num_key_blocks))
    for start in range(0, num_query_blocks, chunk):
        scores = (q_means[:, :, start : start + chunk] @ keys_t) * scale
        query_blocks = torch.arange(start, start + scores.shape[2], device=q_means.device)
        scores = scores.masked_fill(key_blocks[None, :] > query_blocks[:, None], float("-inf"))
        best = _pack_keys(scores).topk(topk_blocks, dim=-1).values
        indices[:, :, start : start + chunk] = (_LOW_WORD - (best & _LOW_WORD)).to(torch.int32)
    return indices


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, topk_blocks: int, block_size: int, scale: float, causal: bool = False
) -> torch.Tensor:
    """``[B, H, Nqb, topk_blocks]`` int32: the selected key blocks of each query block, best first
    (needs ``topk_blocks < Nkb``). Causal: the eligible blocks (``J <= I``) first."""
    q_means, k_means = block_means(q, block_size), block_means(k, block_size)
    if causal:
        return _select_blocks_causal(q_means, k_means, topk_blocks, scale)
    return select_topk(q_means, k_means, topk_blocks, scale)


def block_map(indices: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed selection: ``(offsets, query_blocks)``. The query blocks that selected key block
    ``J`` of (batch, head) ``bh`` are ``query_blocks[offsets[bh * Nkb + J] : offsets[bh * Nkb + J + 1]]``,
    in increasing order (``selection_map``: a counting sort of the saved indices)."""
    return selection_map(indices, num_key_blocks)


def _constexprs(
    dense: bool, causal: bool, head_dim: int, block_size: int, tile: Tile, dtype: torch.dtype, interpret: bool
):  # fmt: skip
    return {
        "DENSE": dense, "CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_SIZE": block_size,
        "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "UPCAST": interpret,
        "IEEE_FP32": dtype == torch.float32,
    }  # fmt: skip


def block_topk_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_blocks: int,
    block_size: int,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, indices)``; ``indices`` ``[B, H, Nqb, topk_blocks]`` int32, or ``[B, H, Nqb, 0]``
    when ``topk_blocks >= Nkb`` (dense: every block; causal: every block at or before the query's)."""
    batch, heads, num_queries, _ = q.shape
    num_query_blocks = triton.cdiv(num_queries, block_size)
    dense = topk_blocks >= triton.cdiv(k.shape[2], block_size)
    if dense or batch * heads * num_queries * q.shape[3] == 0:
        indices = torch.empty((batch, heads, num_query_blocks, 0 if dense else topk_blocks),
                              dtype=torch.int32, device=q.device)  # fmt: skip
    else:
        indices = select_blocks(q, k, topk_blocks, block_size, scale, causal)
    out, lse = block_attention_forward(q, k, v, indices, block_size, scale, causal)
    return out, lse, indices


def block_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over given key blocks: ``indices`` ``[B, H, Nqb, S]`` int32 (the
    blocks each query block attends; ``S = 0``: every block)."""
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    num_key_blocks = triton.cdiv(num_keys, block_size)
    dense = indices.shape[-1] == 0
    out = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    interpret = _interpret(q)
    tile = attention_tile(block_size, head_dim, q.dtype, "forward", interpret)
    grid = forward_grid(batch, heads, num_queries, block_size, head_dim, q.dtype, interpret)
    qk_scale = max(abs(scale) * LOG2E, MIN_QK_SCALE)
    _block_attention_forward_kernel[grid](
        q, k, v, indices, out, lse, num_queries, num_keys, num_key_blocks if dense else indices.shape[-1],
        heads, qk_scale, int(scale < 0), *_strides(q), *_strides(k), *_strides(v),
        **_constexprs(dense, causal, head_dim, block_size, tile, q.dtype, interpret),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out, lse


def block_topk_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    num_key_blocks = triton.cdiv(num_keys, block_size)
    dense = indices.shape[-1] == 0
    dq = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, num_keys, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, heads, num_keys, head_dim), dtype=v.dtype, device=q.device)
    if num_queries == 0 or batch * heads == 0:
        return dq, dk.zero_(), dv.zero_()
    if num_keys == 0:
        return dq.zero_(), dk, dv
    interpret = _interpret(q)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    indices = indices.contiguous()
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    num_selected = num_key_blocks if dense else indices.shape[-1]
    tile = attention_tile(block_size, head_dim, q.dtype, "dq", interpret)
    _block_attention_dq_kernel[dq_grid(batch, heads, num_queries, block_size, head_dim, q.dtype, interpret)](
        q, k, v, grad_out, lse, delta, indices, dq, num_queries, num_keys, num_selected, heads, scale,
        *strides, **_constexprs(dense, causal, head_dim, block_size, tile, q.dtype, interpret),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    if dense:
        offsets = query_blocks = torch.zeros(1, dtype=torch.int32, device=q.device)
    else:
        offsets, query_blocks = block_map(indices, num_key_blocks)
    tile = attention_tile(block_size, head_dim, q.dtype, "dkdv", interpret)
    _block_attention_dkdv_kernel[dkdv_grid(batch, heads, num_keys, block_size, head_dim, q.dtype, interpret)](
        q, k, v, grad_out, lse, delta, offsets, query_blocks, dk, dv, num_queries, num_keys, heads, scale,
        *strides, **_constexprs(dense, causal, head_dim, block_size, tile, q.dtype, interpret),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return dq, dk, dv


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_SCALARS = {"scale": "fp32", "qk_scale": "fp32"}


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps, stages) the launchers can choose on a GPU: block
    means per block size, head size and dtype; the block selection on float32 means (the
    topk_attention selection kernel, one configuration per buffer class); forward, dq and dk/dv per
    dtype, head size and block size, sparse and dense, causal and not."""
    for dtype, name in _DTYPES.items():
        data = f"*{name}"
        pointers = {
            "x_ptr": data, "out_ptr": data, "q_ptr": data, "k_ptr": data, "v_ptr": data,
            "grad_out_ptr": data, "dq_ptr": data, "dk_ptr": data, "dv_ptr": data, "idx_ptr": "*i32",
            "lse_ptr": "*fp32", "delta_ptr": "*fp32", "offsets_ptr": "*i32", "qlist_ptr": "*i32",
        }  # fmt: skip
        for head_dim in SUPPORTED_HEAD_DIMS:
            tags = {"dtype": name, "head_dim": head_dim}
            for block_size in BLOCK_SIZES:
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_SIZE": block_size}
                means_pointers = {**pointers, "out_ptr": "*fp32"}
                yield KernelLaunch(
                    _block_means_kernel, kernel_signature(_block_means_kernel, constexprs, means_pointers),
                    constexprs, means_warps(block_size, head_dim),
                    label=f"means {name} D={head_dim} bs={block_size}",
                    tags={**tags, "block_size": block_size},
                )  # fmt: skip
                for kernel, which in (
                    (_block_attention_forward_kernel, "forward"),
                    (_block_attention_dq_kernel, "dq"),
                    (_block_attention_dkdv_kernel, "dkdv"),
                ):
                    tile = attention_tile(block_size, head_dim, dtype, which)
                    for dense in (False, True):
                        for causal in (False, True):
                            constexprs = _constexprs(dense, causal, head_dim, block_size, tile, dtype, False)
                            variant = (" dense" if dense else "") + (" causal" if causal else "")
                            yield KernelLaunch(
                                kernel, kernel_signature(kernel, constexprs, pointers, _SCALARS), constexprs,
                                tile.num_warps, tile.num_stages,
                                label=f"{which} {name} D={head_dim} bs={block_size}{variant}",
                                tags={**tags, "block_size": block_size, "dense": dense, "causal": causal},
                            )  # fmt: skip
    # The selection runs on float32 block means whatever the input dtype; it stores no scores.
    pointers = {
        "q_ptr": "*fp32",
        "k_ptr": "*fp32",
        "idx_ptr": "*i32",
        "cand_ptr": "*i64",
        "scores_ptr": "*fp32",
    }
    for head_dim in SUPPORTED_HEAD_DIMS:
        topk = 32
        while topk <= 256:
            tile = selection_tile(topk, head_dim, torch.float32)
            constexprs = _selection_constexprs(
                tile, head_dim, torch.float32, interpret=False, store_scores=False
            )
            yield KernelLaunch(
                _select_topk_kernel, kernel_signature(_select_topk_kernel, constexprs, pointers, _SCALARS),
                constexprs, tile.num_warps, tile.num_stages,
                label=f"select blocks fp32 D={head_dim} topk_blocks<={topk}",
                tags={"dtype": "fp32", "head_dim": head_dim, "topk": topk},
            )  # fmt: skip
            topk *= 2
