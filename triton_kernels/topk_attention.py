"""Top-k sparse attention in Triton: selection, forward and backward without an Nq x Nk matrix.

Three kernels, each with a one-axis grid of ``B * H * ceil(Nq / BLOCK_M)`` programs (axis 0 takes
2**31 - 1; axes 1 and 2 only 65,535), query blocks of one (batch, head) adjacent so they share keys in L2:

1. ``_select_topk_kernel`` finds the ``topk`` keys of each query in one flash-style pass over key
   blocks of ``BLOCK_K`` keys: the score tile ``scale * Q K^T`` comes from ``tl.dot`` (float32
   accumulation). Each score is packed with its key index into one int64 (order-preserving float
   bits in the high word, ``2**32 - 1 - index`` in the low word), so one integer order sorts by
   score and breaks ties towards the lower key index, and the index travels with its score. Per
   query the kernel keeps ``best``, the ``BLOCK_N >= topk`` best keys merged so far (sorted
   descending), the float32 score of its ``topk``-th entry (the *threshold*, ``-inf`` until it holds
   ``topk`` keys) and a candidate buffer with a fill count. ``best`` and the buffers live in the
   program's global scratch (L1/L2), so the key loop holds nothing in registers but its score tile:
   the tile can be 128 query rows (two warpgroups: the dot on wgmma) for every topk.

   The keys are walked in *segments* of ``SEGMENT`` blocks. Within a segment, the key loop is the
   hot loop: no barrier and no nested loop in it, so Triton pipelines its K tile loads (async
   copies, two stages).

   - *Row filter*: a row whose block maximum is below its threshold has no candidate in the block;
     when no row of the tile has one, the block costs its dot, the scale and a row max (no
     per-score candidate work). Keys past the end load as NaN, so their scores are NaN, which no
     comparison passes and the row max skips.
   - *Filter*: a key whose score is below the threshold can never be selected (the threshold only
     rises). One float comparison per score, ``score >= threshold``, gives the block's candidates
     and a row sum their count per query. ``>=`` rather than ``>``: an equal score loses its tie in
     the merge anyway (every later key has a higher index than every key already merged), and a
     row holding fewer than ``topk`` keys has threshold ``-inf``, which a ``-inf`` score (float32
     overflow) must pass. NaN scores pass no threshold; a slot they leave empty is filled with key
     0, so indices always stay in range.
   - *Append*, loop-free: each candidate is stored to slot ``fill + rank`` of its row's buffer,
     ``rank`` its position among the row's candidates (a prefix sum along the row), as
     ``key << 32 | float32 bits``. A buffer holds ``SEGMENT * BLOCK_K + BLOCK_N`` candidates: a
     segment can append at most ``SEGMENT * BLOCK_K`` per row.
   - *Merge*, between segments: when some row holds more than ``BLOCK_N`` candidates (so the next
     segment might not fit), and after the last segment, every row's buffer is merged into its
     ``best`` in chunks of ``BLOCK_N`` (``MERGE_ROWS`` rows at a time: two ``[MERGE_ROWS, BLOCK_N]``
     int64 tiles in registers), the thresholds are raised and the buffers emptied. A merge sorts
     the incoming keys ascending (tl.sort on a GPU, a sorting network when interpreting) and takes
     the elementwise max with ``best`` (sorted descending): by the bitonic-merge property that is a
     bitonic sequence holding the ``BLOCK_N`` best of both, so the last bitonic stage alone
     (``log2 BLOCK_N`` compare-exchange steps) sorts it. Block barriers before and after a merge
     make every thread's appends visible to the threads that merge them, and the merged keys to
     every thread.

   The threshold is raised at merges only, so within a segment it lags: the first segments take
   every key (``-inf``), after which a row is merged when it has gathered ``BLOCK_N`` candidates,
   and each merge lowers the rate at which later keys pass. With keys in random order a query's
   top-k changes about ``topk * ln(Nk / topk)`` times in all, mostly early. The first ``topk``
   indices of ``best`` are stored as int32. Above ``TRITON_MAX_TOPK`` the best keys per row would
   make the merges too large; the selection then runs in torch over query chunks (temporary memory
   bounded by ``_CHUNK_ELEMENTS`` scores) with the same packed keys, so the tie rule is the same.

   Tiles (``selection_tile``): 16-bit inputs 128 query rows on 8 warps, the score dot on wgmma;
   float32 64 rows with IEEE products on CUDA cores over head-dim slices of 16; 64-key blocks, 4
   blocks per segment. Predicted cost (SASS thread-instructions per score, static counts of the
   sm_90 code compiled as a launch on contiguous tensors, ``bench/results/kernel_budget.md``; not
   measured on a GPU), bf16, D = 64, every topk class: a block the row filter skips about 6.3, a
   block that appends about 27 (the key loop alone; merges come between segments). Before the
   segments (best keys in registers): 6.6 / 37.5 at topk <= 32 and 64-128 query rows, but 32-row
   mma.sync tiles and synchronous K loads at topk >= 128.
2. ``_sparse_forward_kernel`` runs an online (flash-style) softmax over each query's selected keys
   and sums their gathered V rows on CUDA cores (each query has its own keys, so there is no shared
   matmul), writing the output and the log-sum-exp. The scores are the selection's own: its
   epilogue stores each selected key's scaled score beside its index (a float32 temporary of the
   indices' size), so the forward gathers only V and computes no ``q . k`` (the forward is fused
   into the selection's result). The keys come best first, so slot 0 holds each row's largest
   score and the softmax takes one pass, one slot at a time: a thread owns a slice of D of its
   queries' accumulators, with no reduction across lanes. Dense mode (``topk >= Nk``) has no
   selection and gathers K too. Base 2: one multiply and one MUFU.EX2 per score, the lse natural.
3. The backward, without atomics (the same inputs give bit-identical gradients on every run):
   ``_sparse_backward_dq_kernel`` gathers the selected rows again per query, one key of each of
   its ``BLOCK_M`` queries per step, recomputes the probabilities from the saved log-sum-exp and
   ``delta = rowsum(dO * O)`` (base 2), and accumulates dq in registers;
   ``_sparse_backward_dkdv_kernel`` is key-major: ``selection_map`` transposes the saved indices by
   an int32 counting sort (counts per key, offsets by a prefix sum, queries in increasing order per
   key from a stable sort of 32-bit keys), and each program owns ``BLOCK_N`` keys, gathers one of
   the queries that selected each of them per step, and accumulates dk and dv in registers, written
   once. Both reduce over D only (no reduction across selected keys in a step).

Why saved indices instead of recomputing the selection in backward: membership is decided at the
k-th score exactly, and a score recomputed by a differently shaped kernel may round differently
and flip a key in or out. Saving the indices (4 bytes per query per selected key) makes the
backward use exactly the forward's keys.

``topk >= Nk`` is dense attention: no selection, no indices; kernels 2 and 3 walk all keys.

Costs per (batch, head), element size ``e``, ``Nq`` queries, ``Nk`` keys, ``k = topk``:

- selection: ``2 Nq Nk D`` FLOPs of ``tl.dot``, reads Q once and K ``ceil(Nq / BLOCK_M)`` times
  (from L2 mostly), writes ``4 Nq k`` bytes of indices; a row max per block, and where the row
  filter lets a block through one comparison, a prefix sum and a masked 8-byte store per score
  (the candidates' stores reach the scratch); ``O(BLOCK_N log^2 BLOCK_N)`` per query for each merged
  chunk of a buffer. Scratch: ``8 (SEGMENT BLOCK_K + 2 BLOCK_N + 1)`` bytes per query row, at most
  ``8 * _SCRATCH_ENTRIES`` bytes (128 MiB) per call.
- forward: ``2 Nq k D`` FLOPs (the weighted sum of V; the scores come from the selection), reads
  ``4 Nq k`` bytes of scores and gathers ``Nq k D e`` bytes of V rows (from L2 where neighbouring
  queries share keys), writes ``Nq D e + 4 Nq`` bytes; dense mode scores every key: ``4 Nq Nk D``
  FLOPs and ``2 Nq Nk D e`` bytes of K/V rows.
- backward: ``8 Nq k D`` FLOPs in each of the dq and dk/dv passes (scores and probabilities are
  recomputed in both), gathers ``2 Nq k D e`` bytes per pass (K/V rows, then Q/dO rows), writes
  dq, dk, dv once each; the map costs a stable sort of the ``Nq k`` saved indices as int32 keys
  and ``4 (Nq k + Nk)`` bytes.
- memory kept for backward: indices ``4 Nq k`` and lse ``4 Nq`` bytes, so O(N (D + k)) in all.

Math in float32 throughout; scores for the selection use ``tl.dot`` with float32 accumulation
(IEEE float32 products for float32 inputs, not TF32, so selection matches float32 math).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Largest topk selected by the Triton kernel (the buffer is BLOCK_N = next_pow2(topk) int64 per query).
TRITON_MAX_TOPK = 256
# Scores materialized at once by the torch selection used above TRITON_MAX_TOPK.
_CHUNK_ELEMENTS = 1 << 24
# Entries of the selection's candidate scratch (int64: 128 MiB) allocated by one select_topk call.
_SCRATCH_ENTRIES = 1 << 24
_LOW_WORD = 4294967295  # 2**32 - 1: the key-index word of a packed key


@triton.jit
def _compare_swap(x, M: tl.constexpr, N: tl.constexpr, STRIDE: tl.constexpr, RUN: tl.constexpr,
                  DESCENDING: tl.constexpr):  # fmt: skip
    """One bitonic step on rows of ``x`` [M, N]: order pairs ``(i, i + STRIDE)``, direction
    alternating every ``RUN`` elements (``RUN == N``: all ``DESCENDING``)."""
    pairs = tl.permute(tl.reshape(x, [M, N // (2 * STRIDE), 2, STRIDE]), [0, 1, 3, 2])
    first, second = tl.split(pairs)
    group = tl.arange(0, N // (2 * STRIDE))
    flip = ((group * (2 * STRIDE)) // RUN) % 2 == 1
    descending = (flip != DESCENDING)[None, :, None]
    low = tl.minimum(first, second)
    high = tl.maximum(first, second)
    pairs = tl.join(tl.where(descending, high, low), tl.where(descending, low, high))
    return tl.reshape(tl.permute(pairs, [0, 1, 3, 2]), [M, N])


@triton.jit
def _network_sort(x, M: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Bitonic sort of each row from elementwise ops, reshapes and joins. tl.sort reduces with a
    custom combine function, which the interpreter runs element by element in Python (about 100x
    slower); this network is what runs under TRITON_INTERPRET."""
    for stage in tl.static_range(1, LOG_N + 1):
        for step in tl.static_range(stage):
            x = _compare_swap(x, M, N, 1 << (stage - 1 - step), 1 << stage, DESCENDING)
    return x


@triton.jit
def _network_merge(x, M: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort rows that are bitonic (only the last stage of ``_network_sort``)."""
    for step in tl.static_range(LOG_N):
        x = _compare_swap(x, M, N, 1 << (LOG_N - 1 - step), N, DESCENDING)
    return x


@triton.jit
def _pack_keys(scores, key_index):
    """int64 keys ordered as (score, -key_index): ``scores`` and ``key_index`` [M, N]."""
    scores = tl.where(scores == 0.0, 0.0, scores)
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (4294967295 - key_index.to(tl.int64))


@triton.jit
def _unpack_scores(packed):
    """The float32 scores of packed keys: the inverse of the packing's order-preserving map (it is
    its own inverse). An empty slot (the smallest key) reads as NaN."""
    ordered = (packed >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_into(best, packed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr,
                NATIVE_SORT: tl.constexpr):  # fmt: skip
    """The ``BLOCK_N`` best of ``best`` (sorted descending) and ``packed`` (any order), sorted
    descending: sort ``packed`` ascending, take the elementwise max (a bitonic sequence holding the
    ``BLOCK_N`` best of both), then the last bitonic stage sorts it."""
    if NATIVE_SORT:
        ascending = tl.sort(packed, dim=1)
    else:
        ascending = _network_sort(packed, BLOCK_M, BLOCK_N, LOG_N, False)
    return _network_merge(tl.maximum(best, ascending), BLOCK_M, BLOCK_N, LOG_N, True)


@triton.jit
def _merge_buffers(cand_base, best_base, fill_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAPACITY: tl.constexpr, MERGE_ROWS: tl.constexpr, LOG_N: tl.constexpr,
                   NATIVE_SORT: tl.constexpr):  # fmt: skip
    """Merge every row's held candidates into its ``best`` keys (both in the program's scratch), in
    groups of ``MERGE_ROWS`` rows and chunks of ``BLOCK_N`` candidates: a ``[MERGE_ROWS, BLOCK_N]``
    pair of int64 tiles is all a merge holds in registers."""
    cols = tl.arange(0, BLOCK_N)
    for first_row in range(0, BLOCK_M, MERGE_ROWS):
        group = first_row + tl.arange(0, MERGE_ROWS)
        group_fill = tl.load(fill_base + group).to(tl.int32)
        best_offsets = best_base + group[:, None] * BLOCK_N + cols[None, :]
        best = tl.load(best_offsets)
        for chunk in range(0, tl.max(group_fill, axis=0), BLOCK_N):
            slots = chunk + cols
            held_ok = slots[None, :] < group_fill[:, None]
            held = tl.load(cand_base + group[:, None] * CAPACITY + slots[None, :], mask=held_ok, other=0)
            held_scores = (held & 4294967295).to(tl.int32).to(tl.float32, bitcast=True)
            incoming = tl.where(held_ok, _pack_keys(held_scores, (held >> 32).to(tl.int32)),
                                -9223372036854775807)  # fmt: skip
            best = _merge_into(best, incoming, MERGE_ROWS, BLOCK_N, LOG_N, NATIVE_SORT)
        tl.store(best_offsets, best)


@triton.jit
def _select_topk_kernel(
    q_ptr, k_ptr, idx_ptr, scores_ptr, cand_ptr,
    num_queries, num_keys, topk, heads, bh_start, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SEGMENT: tl.constexpr, MERGE_ROWS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr, NATIVE_SORT: tl.constexpr, LOG_N: tl.constexpr,
    DOT_CHUNK: tl.constexpr, STORE_SCORES: tl.constexpr,
):  # fmt: skip
    # Scores are tl.dot over head-dim slices of DOT_CHUNK (float32 IEEE products run on CUDA cores,
    # and a whole [D, BLOCK_K] float32 operand per step would not fit in registers); the slices
    # accumulate in order, as one dot over D does.
    CAPACITY: tl.constexpr = SEGMENT * BLOCK_K + BLOCK_N  # candidates a row's buffer holds
    query_blocks = tl.cdiv(num_queries, BLOCK_M)
    program = tl.program_id(0)
    pid_bh = bh_start + program // query_blocks
    pid_m = program % query_blocks
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    local = tl.arange(0, BLOCK_M)
    rows = pid_m * BLOCK_M + local
    dims = tl.arange(0, DOT_CHUNK)
    key_cols = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_queries

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    q_offsets = rows.to(tl.int64)[:, None] * stride_qn + dims[None, :] * stride_qd
    if DOT_CHUNK == HEAD_DIM:
        q = tl.load(q_base + q_offsets, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
    # This program's scratch (L1/L2): per row a candidate buffer of CAPACITY raw keys, the BLOCK_N
    # best packed keys (sorted descending) and the buffer's fill, read by the merges only.
    cand_base = cand_ptr + program.to(tl.int64) * (BLOCK_M * (CAPACITY + BLOCK_N + 1))
    best_base = cand_base + BLOCK_M * CAPACITY
    fill_base = best_base + BLOCK_M * BLOCK_N
    for first_row in range(0, BLOCK_M, MERGE_ROWS):
        group = first_row + tl.arange(0, MERGE_ROWS)
        empty = tl.full([MERGE_ROWS, BLOCK_N], -9223372036854775807, tl.int64)
        tl.store(best_base + group[:, None] * BLOCK_N + cols[None, :], empty)

    fill = tl.zeros([BLOCK_M], tl.int32)  # candidates held per row (slots 0 .. fill - 1)
    threshold = tl.full([BLOCK_M], float("-inf"), tl.float32)  # score of the topk-th of best
    num_blocks = tl.cdiv(num_keys, BLOCK_K)
    for first_block in range(0, num_blocks, SEGMENT):
        # The hot loop: SEGMENT key blocks, their K tiles pipelined; no barrier and no nested loop.
        for block in range(first_block, tl.minimum(first_block + SEGMENT, num_blocks)):
            keys = block * BLOCK_K + key_cols
            key_ok = keys < num_keys
            k_offsets = keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd
            scores = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            for d0 in tl.static_range(0, HEAD_DIM, DOT_CHUNK):
                if DOT_CHUNK != HEAD_DIM:
                    q = tl.load(q_base + q_offsets + d0 * stride_qd, mask=row_ok[:, None], other=0.0)
                    if UPCAST:
                        q = q.to(tl.float32)
                # Keys past the end load as NaN, so their scores are NaN and pass no threshold.
                k_tile = tl.load(
                    k_base + k_offsets + d0 * stride_kd, mask=key_ok[None, :], other=float("nan")
                )
                if UPCAST:
                    k_tile = k_tile.to(tl.float32)
                if IEEE_FP32:
                    scores = tl.dot(q, k_tile, scores, input_precision="ieee")
                else:
                    scores = tl.dot(q, k_tile, scores)
            scores = scores * scale
            # Row filter: a row whose block maximum is below its threshold has no candidate in the
            # block; when no row of the tile has one, the block costs its dot and a row max only (the
            # max skips NaN scores, as the comparison does).
            if tl.max((tl.max(scores, axis=1) >= threshold).to(tl.int32), axis=0) > 0:
                # A key below the topk-th score can never be selected (the topk-th only rises). ``>=``,
                # not ``>``: a key equal to it loses the tie in the merge (its index is higher), and
                # while a row holds fewer than topk keys its threshold is -inf, which a -inf score
                # must pass. Each candidate goes to slot fill + (its rank among the row's candidates),
                # a prefix sum along the row, as (key << 32 | float32 bits), packed when merged.
                above = scores >= threshold[:, None]
                slot = fill[:, None] + tl.cumsum(above.to(tl.int32), axis=1) - 1
                bits = scores.to(tl.int32, bitcast=True).to(tl.int64) & 4294967295
                raw = (keys.to(tl.int64)[None, :] << 32) | bits
                tl.store(cand_base + local[:, None] * CAPACITY + slot, raw, mask=above)
                fill += tl.sum(above.to(tl.int32), axis=1)
        # A row holding more than BLOCK_N might overflow in the next segment (SEGMENT * BLOCK_K more):
        # merge the buffers then, and after the last segment. The barriers make every thread's
        # appends visible to the merge, and the merged keys to every thread before appends resume.
        if (tl.max(fill, axis=0) > BLOCK_N) | (first_block + SEGMENT >= num_blocks):
            tl.store(fill_base + local, fill.to(tl.int64))
            tl.debug_barrier()
            _merge_buffers(cand_base, best_base, fill_base, BLOCK_M, BLOCK_N, CAPACITY, MERGE_ROWS, LOG_N,
                           NATIVE_SORT)  # fmt: skip
            tl.debug_barrier()
            kth = tl.load(best_base + local * BLOCK_N + (topk - 1))
            threshold = tl.where(kth == -9223372036854775807, float("-inf"), _unpack_scores(kth))
            fill = tl.zeros([BLOCK_M], tl.int32)

    # A slot left empty (only where NaN scores were never admitted) gets key 0, so every index
    # stays in range; NaN inputs give NaN-dependent output, not an out-of-bounds read.
    for first_row in range(0, BLOCK_M, MERGE_ROWS):
        group = first_row + tl.arange(0, MERGE_ROWS)
        best = tl.load(best_base + group[:, None] * BLOCK_N + cols[None, :])
        selected = tl.where(best == -9223372036854775807, 0, (4294967295 - (best & 4294967295)).to(tl.int32))
        group_rows = pid_m * BLOCK_M + group
        out_offsets = (pid_bh.to(tl.int64) * num_queries * topk + group_rows.to(tl.int64)[:, None] * topk
                       + cols[None, :])  # fmt: skip
        out_mask = (group_rows < num_queries)[:, None] & (cols < topk)[None, :]
        tl.store(idx_ptr + out_offsets, selected, mask=out_mask)
        if STORE_SCORES:  # the forward's softmax reads them instead of recomputing q . k (NaN: empty slot)
            tl.store(scores_ptr + out_offsets, _unpack_scores(best), mask=out_mask)


@triton.jit
def _gather_rows(base, stride_n, stride_d, key, dims, valid):
    """``[M, K, D]`` float32 rows ``base[key[m, j], :]`` (zeros where not ``valid``)."""
    offsets = key.to(tl.int64)[:, :, None] * stride_n + dims[None, None, :] * stride_d
    return tl.load(base + offsets, mask=valid[:, :, None], other=0.0).to(tl.float32)


@triton.jit
def _load_rows(base, stride_n, stride_d, rows, dims, valid):
    """``[M, D]`` float32 rows ``base[rows[m], :]`` (zeros where not ``valid``)."""
    offsets = rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d
    return tl.load(base + offsets, mask=valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _selected_keys(idx_base, rows, row_ok, slots, num_selected, DENSE: tl.constexpr):
    """Key index ``[M, K]`` of selection slots ``slots`` and which of them exist."""
    valid = row_ok[:, None] & (slots < num_selected)[None, :]
    if DENSE:
        key = slots[None, :] + tl.zeros_like(rows)[:, None]
    else:
        key = tl.load(
            idx_base + rows.to(tl.int64)[:, None] * num_selected + slots[None, :], mask=valid, other=0
        )
    return key, valid


@triton.jit
def _sparse_forward_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, scores_ptr, out_ptr, lse_ptr,
    num_queries, num_selected, heads, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    DENSE: tl.constexpr, GIVEN_SCORES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Softmax over each query's selected keys and the weighted sum of their values. ``GIVEN_SCORES``:
    the selection's scores (``scores_ptr``, ``[B, H, Nq, S]``, already scaled) are read instead of
    gathering K and recomputing ``q . k``; only V is gathered. Base 2 throughout (one multiply and
    one MUFU.EX2 per score); the stored lse is natural."""
    query_blocks = tl.cdiv(num_queries, BLOCK_M)
    pid_bh = tl.program_id(0) // query_blocks
    pid_m = tl.program_id(0) % query_blocks
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_queries

    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    selection = pid_bh.to(tl.int64) * num_queries * num_selected
    idx_base = idx_ptr + selection
    if not GIVEN_SCORES:
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows.to(tl.int64)[:, None] * stride_qn
                    + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    log2_scale = scale * 1.4426950408889634

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # base 2
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if GIVEN_SCORES:
        # The selection stores each query's keys best first, so slot 0 holds the row's largest score:
        # one pass, one slot at a time, each query's value row scaled by its probability and added
        # in registers (no reduction across lanes: a thread owns a slice of D of its queries' rows).
        score_rows = scores_ptr + selection + rows.to(tl.int64) * num_selected
        idx_rows = idx_base + rows.to(tl.int64) * num_selected
        row_max = tl.load(score_rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        for slot in range(0, num_selected):
            key = tl.load(idx_rows + slot, mask=row_ok, other=0)
            score = tl.load(score_rows + slot, mask=row_ok, other=float("-inf"))
            prob = tl.math.exp2(score * 1.4426950408889634 - shift)
            row_sum += prob
            v_row = tl.load(v_base + key.to(tl.int64)[:, None] * stride_vn + dims[None, :] * stride_vd,
                            mask=row_ok[:, None], other=0.0)  # fmt: skip
            acc += prob[:, None] * v_row.to(tl.float32)
    else:
        for start in range(0, num_selected, BLOCK_K):
            slots = start + tl.arange(0, BLOCK_K)
            key, valid = _selected_keys(idx_base, rows, row_ok, slots, num_selected, DENSE)
            k_rows = _gather_rows(k_base, stride_kn, stride_kd, key, dims, valid)
            scores = tl.sum(q[:, None, :] * k_rows, axis=2) * log2_scale
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows past the end see no key
            rescale = tl.math.exp2(row_max - shift)
            probs = tl.math.exp2(scores - shift[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            v_rows = _gather_rows(v_base, stride_vn, stride_vd, key, dims, valid)
            acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v_rows, axis=1)
            row_max = new_max

    row_sum = tl.where(row_ok, row_sum, 1.0)
    out = acc / row_sum[:, None]
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453  # natural log
    out_offsets = pid_bh.to(tl.int64) * num_queries * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM
    tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * num_queries + rows, lse, mask=row_ok)


@triton.jit
def _sparse_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, idx_ptr, dq_ptr,
    num_queries, num_selected, heads, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    DENSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query-major dq: ``BLOCK_M`` queries per program, one selected key of each per step (its K and V
    rows gathered, ``[BLOCK_M, D]``); the two dot products per score reduce over D only, and dq
    accumulates in registers. Base 2: ``p = exp2(q . k * scale log2(e) - lse log2(e))``."""
    query_blocks = tl.cdiv(num_queries, BLOCK_M)
    pid_bh = tl.program_id(0) // query_blocks
    pid_m = tl.program_id(0) % query_blocks
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_queries
    rows64 = rows.to(tl.int64)

    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    idx_rows = idx_ptr + pid_bh.to(tl.int64) * num_queries * num_selected + rows64 * num_selected
    row_base = pid_bh.to(tl.int64) * num_queries
    q = _load_rows(q_ptr + batch * stride_qb + head * stride_qh, stride_qn, stride_qd, rows, dims, row_ok)
    g_base = grad_out_ptr + batch * stride_gb + head * stride_gh
    grad_out = _load_rows(g_base, stride_gn, stride_gd, rows, dims, row_ok)
    lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)  # sum_j p_j dp_j
    log2_scale = scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for slot in range(0, num_selected):
        if DENSE:
            key = slot + tl.zeros_like(rows)
        else:
            key = tl.load(idx_rows + slot, mask=row_ok, other=0)
        k_row = _load_rows(k_base, stride_kn, stride_kd, key, dims, row_ok)
        v_row = _load_rows(v_base, stride_vn, stride_vd, key, dims, row_ok)
        probs = tl.where(row_ok, tl.math.exp2(tl.sum(q * k_row, axis=1) * log2_scale - lse2), 0.0)
        grad_scores = probs * (tl.sum(grad_out * v_row, axis=1) - delta)
        dq += grad_scores[:, None] * k_row

    out_offsets = row_base * HEAD_DIM + rows64[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dq_ptr + out_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, offsets_ptr, qlist_ptr, dk_ptr, dv_ptr,
    num_queries, num_keys, heads, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    DENSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key-major dk, dv: ``BLOCK_N`` keys per program, each with the queries that selected it (in
    increasing query order, from the selection map), one query of each per step (its Q and dO rows
    gathered, ``[BLOCK_N, D]``); reductions over D only, dk and dv in registers, each key row written
    once."""
    key_blocks = tl.cdiv(num_keys, BLOCK_N)
    pid_bh = tl.program_id(0) // key_blocks
    pid_n = tl.program_id(0) % key_blocks
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < num_keys
    keys64 = keys.to(tl.int64)

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    g_base = grad_out_ptr + batch * stride_gb + head * stride_gh
    row_base = pid_bh.to(tl.int64) * num_queries
    k = _load_rows(k_ptr + batch * stride_kb + head * stride_kh, stride_kn, stride_kd, keys, dims, key_ok)
    v = _load_rows(v_ptr + batch * stride_vb + head * stride_vh, stride_vn, stride_vd, keys, dims, key_ok)
    if DENSE:
        start = tl.zeros([BLOCK_N], tl.int32)
        count = tl.where(key_ok, num_queries, 0)
    else:
        entry = pid_bh.to(tl.int64) * num_keys + keys64
        start = tl.load(offsets_ptr + entry, mask=key_ok, other=0)
        count = tl.load(offsets_ptr + entry + 1, mask=key_ok, other=0) - start
    log2_scale = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for step in range(0, tl.max(count, axis=0)):
        valid = step < count
        if DENSE:
            query = step + tl.zeros_like(keys)
        else:
            query = tl.load(qlist_ptr + (start + step).to(tl.int64), mask=valid, other=0)
        q_row = _load_rows(q_base, stride_qn, stride_qd, query, dims, valid)
        g_row = _load_rows(g_base, stride_gn, stride_gd, query, dims, valid)
        lse2 = tl.load(lse_ptr + row_base + query, mask=valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + query, mask=valid, other=0.0)
        probs = tl.where(valid, tl.math.exp2(tl.sum(k * q_row, axis=1) * log2_scale - lse2), 0.0)
        grad_scores = probs * (tl.sum(v * g_row, axis=1) - delta)
        dv += probs[:, None] * g_row
        dk += grad_scores[:, None] * q_row

    out_offsets = pid_bh.to(tl.int64) * num_keys * HEAD_DIM + keys64[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


# --- tile choice and grids (shared by the launchers and launch_configs) -------------------------------

# Programs on grid axis 0 (CUDA's limit; axes 1 and 2 are not used).
MAX_PROGRAMS = 2**31 - 1
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# sm_90 (227 KB of shared memory per block, 255 registers per thread), checked by compiling
# launch_configs() under triton 3.6 and 3.8: nothing spills but the dense-mode forward at 16-bit
# D = 32 (allowance below).
# Scores per program per iteration of the selection's key-block loop: bench/kernel_budget.py divides
# the loop's SASS instruction counts by it (instructions per score, a prediction).
SASS_LOOP_WORK = {
    "_select_topk_kernel": lambda constexprs: constexprs["BLOCK_M"] * constexprs["BLOCK_K"],
    # Over the selection's scores the main loop takes one slot of BLOCK_M queries per iteration.
    "_sparse_forward_kernel": lambda constexprs: (
        constexprs["BLOCK_M"] * (1 if constexprs.get("GIVEN_SCORES") else constexprs["BLOCK_K"])
    ),
}


def _contiguous_launch(constexprs: dict) -> dict[str, int]:
    """Argument values of a selection launch on contiguous ``[B, H, N, D]`` tensors from torch's
    allocator, on which Triton specializes (bench/kernel_budget.py compiles what such a launch
    compiles): pointers 16-byte aligned, unit head-dim strides, the other strides multiples of D
    (itself a multiple of 16). Sizes (``num_queries``, ``topk``, ...) are left general."""
    head_dim, rows, heads = constexprs["HEAD_DIM"], 1000, 8  # any N, H: only divisibility matters
    strides = {"b": heads * rows * head_dim, "h": rows * head_dim, "n": head_dim, "d": 1}
    values = {"q_ptr": 16, "k_ptr": 16, "idx_ptr": 16, "scores_ptr": 16, "cand_ptr": 16}
    values.update({f"stride_{t}{axis}": stride for t in "qk" for axis, stride in strides.items()})
    return values


LAUNCH_SPECIALIZATION = {"_select_topk_kernel": _contiguous_launch}
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "_select_topk_kernel": SpillAllowance(
        112,
        "BLOCK_N = 256 (topk 129-256) only: headroom for the best buffer and a merge's incoming keys, "
        "2 x 16 x 256 int64 on 256 threads (compiled as a launch on contiguous tensors, no configuration "
        "spills today; LDL/STL counts in the table); every other tile class spills nothing",
    ),
    # Found by compiling every configuration (the representative subset does not hold these tiles).
    "_sparse_forward_kernel": SpillAllowance(
        16, "dense mode (topk >= Nk), 16-bit D = 32 tiles only, at 128 registers: 8 B, 4 to 6 LDL/STL"
    ),
}


@dataclass(frozen=True)
class Tile:
    block_m: int  # queries per program
    block_n: int  # selection: width of the best-keys buffer; gather kernels: selected keys per step
    num_warps: int
    num_stages: int = 3
    dot_chunk: int = 1 << 30  # selection: head-dim slice of each tl.dot (capped at D)
    block_k: int = 32  # selection: keys per block (the score dot's N)
    segment: int = 8  # selection: key blocks between merge checks (the pipelined loop's trip count)
    merge_rows: int = 128  # selection: rows merged at once


def selection_tile(topk: int, head_dim: int, dtype: torch.dtype, interpret: bool = False) -> Tile:
    """Tile of the selection kernel. ``block_n`` (a power of two >= topk) is the width of each row's
    best keys, ``block_k`` the keys per block of the score dot, ``segment`` the blocks of one
    pipelined run between merge checks, ``merge_rows`` the rows a merge holds at once (about 4096
    int64 keys: two such tiles live in a merge).

    The best keys wait in scratch between merges, so the hot loop holds only the score tile: 16-bit
    inputs take 128 query rows (two warpgroups) and 32-key blocks for every topk, the score dot on
    wgmma. Float32 scores use IEEE products on CUDA cores, whose tl.dot holds its operands in
    registers: 64 rows, 32-key blocks, head-dim slices of 16. Two stages (the K tile's next block
    loads while the current one is scored). 256 keys per segment. Registers, spills and
    instructions per score of each class: bench/results/kernel_budget.md.
    """
    block_n = max(32, triton.next_power_of_2(topk))
    if interpret:  # small tiles: many segments and merges in a test's few hundred keys
        return Tile(16, block_n, 4, block_k=16, segment=2, merge_rows=8)
    if dtype == torch.float32:
        block_m, dot_chunk = 64, 16
    else:
        block_m, dot_chunk = 128, head_dim
    merge_rows = min(block_m, max(1, 4096 // block_n))
    return Tile(block_m, block_n, 8, num_stages=2, dot_chunk=dot_chunk, block_k=64, segment=4,
                merge_rows=merge_rows)  # fmt: skip


def sparse_tile(head_dim: int, backward: bool = False, interpret: bool = False) -> Tile:
    """Tile of the gather kernels. Forward over keys it scores itself (dense mode): ``BLOCK_M``
    queries x ``BLOCK_K`` keys x ``D`` values per step, about 4096 values per ``[M, K, D]`` tile.
    Backward (dq query-major, dk/dv key-major): ``block_m`` rows of one gathered ``[rows, D]`` tile per
    step, 2048 values (16 float32 registers per thread and row tile on 4 warps; ``block_n`` unused)."""
    if backward:
        return Tile(64 if interpret else max(1, min(128, 2048 // head_dim)), 1, 4)
    block_k = 16
    if interpret:  # the interpreter amortizes its per-program cost on big tiles
        return Tile(max(1, min(64, 65536 // (block_k * head_dim))), block_k, 4)
    return Tile(max(1, min(64, 4096 // (block_k * head_dim))), block_k, 4)


def given_scores_tile(head_dim: int, interpret: bool = False) -> Tile:
    """Tile of the forward over the selection's scores: ``BLOCK_M`` queries whose ``[BLOCK_M, D]``
    float32 accumulator takes 16 registers per thread on 4 warps (2048 values); one slot per step
    (``BLOCK_N`` is unused)."""
    if interpret:
        return Tile(64, 1, 4)
    return Tile(max(1, min(128, 2048 // head_dim)), 1, 4)


def topk_attention_grid(batch: int, heads: int, num_queries: int, block_m: int) -> tuple[int]:
    """The one-axis grid of every top-k kernel: ``B * H * ceil(Nq / BLOCK_M)`` programs on axis 0."""
    programs = batch * heads * triton.cdiv(num_queries, block_m)
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"topk_attention: B * H * ceil(Nq / {block_m}) = {programs} programs exceed the grid limit "
            f"{MAX_PROGRAMS}"
        )
    return (programs,)


def selection_scratch_entries(tile: Tile) -> int:
    """int64 scratch entries of one selection program: per row a buffer of ``segment * block_k +
    block_n`` candidates, ``block_n`` best keys and the buffer's fill."""
    return tile.block_m * (tile.segment * tile.block_k + 2 * tile.block_n + 1)


def select_topk_grid(
    batch: int,
    heads: int,
    num_queries: int,
    head_dim: int,
    topk: int,
    dtype: torch.dtype,
    interpret: bool = False,
) -> tuple[int]:
    return topk_attention_grid(
        batch, heads, num_queries, selection_tile(topk, head_dim, dtype, interpret).block_m
    )


def topk_attention_forward_grid(
    batch: int,
    heads: int,
    num_queries: int,
    head_dim: int,
    interpret: bool = False,
    given_scores: bool = False,
) -> tuple[int]:
    tile = given_scores_tile(head_dim, interpret) if given_scores else sparse_tile(head_dim, False, interpret)
    return topk_attention_grid(batch, heads, num_queries, tile.block_m)


def topk_attention_backward_grid(
    batch: int, heads: int, num_queries: int, head_dim: int, interpret: bool = False
) -> tuple[int]:
    return topk_attention_grid(batch, heads, num_queries, sparse_tile(head_dim, True, interpret).block_m)


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and interpreting()


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _pack_keys_torch(scores: torch.Tensor) -> torch.Tensor:
    """Same packing as ``_pack_keys`` on a ``[..., Nk]`` float32 score tensor (keys 0 .. Nk - 1)."""
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)
    bits = scores.view(torch.int32).to(torch.int64)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    index = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return (ordered << 32) + (_LOW_WORD - index)


def _select_topk_torch(
    q: torch.Tensor, k: torch.Tensor, topk: int, scale: float, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """The selection for topk > TRITON_MAX_TOPK: torch over query chunks, bounded temporary memory
    (``scores``, when given, receives the selected keys' scaled scores)."""
    batch, heads, num_queries, _ = q.shape
    num_keys = k.shape[2]
    indices = torch.empty((batch, heads, num_queries, topk), dtype=torch.int32, device=q.device)
    keys_t = k.float().transpose(-2, -1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * num_keys))
    for start in range(0, num_queries, chunk):
        chunk_scores = (q[:, :, start : start + chunk].float() @ keys_t) * scale
        best = _pack_keys_torch(chunk_scores).topk(topk, dim=-1)
        indices[:, :, start : start + chunk] = (_LOW_WORD - (best.values & _LOW_WORD)).to(torch.int32)
        if scores is not None:
            scores[:, :, start : start + chunk] = chunk_scores.gather(-1, best.indices)
    return indices


def _selection_constexprs(
    tile: Tile, head_dim: int, dtype: torch.dtype, interpret: bool, native_sort: bool | None = None,
    store_scores: bool = True,
) -> dict:  # fmt: skip
    return {
        "HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
        "SEGMENT": tile.segment, "MERGE_ROWS": tile.merge_rows, "UPCAST": interpret,
        "IEEE_FP32": dtype == torch.float32,
        "NATIVE_SORT": not interpret if native_sort is None else native_sort,
        "LOG_N": tile.block_n.bit_length() - 1, "DOT_CHUNK": min(head_dim, tile.dot_chunk),
        "STORE_SCORES": store_scores,
    }  # fmt: skip


def select_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    scale: float,
    native_sort: bool | None = None,
    segment: int | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, Nq, topk]`` int32 indices of each query's best keys, best first (needs topk < Nk).

    ``scores``: a ``[B, H, Nq, topk]`` float32 tensor that receives the selected keys' scaled scores
    (NaN in a slot no key filled). ``native_sort`` picks tl.sort (default on GPU) or the sorting
    network (default when interpreting). ``segment`` overrides the tile's key blocks between merge
    checks (tests: 1 checks after every block, many blocks fill the buffers between merges); the
    result does not depend on it.
    """
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    if topk > TRITON_MAX_TOPK:
        return _select_topk_torch(q, k, topk, scale, scores)
    indices = torch.empty((batch, heads, num_queries, topk), dtype=torch.int32, device=q.device)
    if indices.numel() == 0:
        return indices
    interpret = _interpret(q)
    tile = selection_tile(topk, head_dim, q.dtype, interpret)
    if segment is not None:
        if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
            raise ValueError(f"segment must be a positive int, got {segment!r}")
        tile = dataclasses.replace(tile, segment=segment)
    constexprs = _selection_constexprs(tile, head_dim, q.dtype, interpret, native_sort, scores is not None)
    # Each program's scratch (candidate buffers, best keys and fills of its rows) is part of at most
    # _SCRATCH_ENTRIES entries: (batch, head) pairs go in launches of as many as fit, one after
    # another on the stream.
    query_blocks = triton.cdiv(num_queries, tile.block_m)
    per_head = query_blocks * selection_scratch_entries(tile)
    heads_per_launch = max(1, min(batch * heads, _SCRATCH_ENTRIES // per_head))
    scratch = torch.empty(heads_per_launch * per_head, dtype=torch.int64, device=q.device)
    no_scores = torch.empty(0, dtype=torch.float32, device=q.device)  # unread (STORE_SCORES off)
    select_topk_grid(batch, heads, num_queries, head_dim, topk, q.dtype, interpret)  # checks the limit
    for bh_start in range(0, batch * heads, heads_per_launch):
        programs = min(heads_per_launch, batch * heads - bh_start) * query_blocks
        _select_topk_kernel[(programs,)](
            q, k, indices, no_scores if scores is None else scores, scratch, num_queries, num_keys, topk,
            heads, bh_start, scale,
            *_strides(q), *_strides(k), **constexprs, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return indices


def topk_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, indices)``; ``indices`` is ``[B, H, Nq, 0]`` when ``topk >= Nk`` (dense)."""
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    dense = topk >= num_keys
    out = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    if dense:
        indices = torch.empty((batch, heads, num_queries, 0), dtype=torch.int32, device=q.device)
        scores = lse  # unread (dense mode scores every key itself)
    else:
        # The selection's scores feed the forward's softmax: it gathers only V (a temporary of the
        # indices' size, not kept for the backward).
        scores = torch.empty((batch, heads, num_queries, topk), dtype=torch.float32, device=q.device)
        indices = select_topk(q, k, topk, scale, scores=scores)
    if out.numel() == 0:
        return out, lse, indices
    interpret = _interpret(q)
    tile = sparse_tile(head_dim, False, interpret) if dense else given_scores_tile(head_dim, interpret)
    grid = topk_attention_forward_grid(batch, heads, num_queries, head_dim, interpret, given_scores=not dense)
    _sparse_forward_kernel[grid](
        q, k, v, indices, scores, out, lse, num_queries, num_keys if dense else topk, heads, scale,
        *_strides(q), *_strides(k), *_strides(v),
        DENSE=dense, GIVEN_SCORES=not dense, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_K=tile.block_n,
        num_warps=tile.num_warps,
    )  # fmt: skip
    return out, lse, indices


def selection_map(indices: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed selection of ``indices`` ``[B, H, M, S]`` (each row: S distinct columns below
    ``num_keys``): ``(offsets, rows)``, int32. The rows that selected column ``j`` of (batch, head)
    ``bh`` are ``rows[offsets[bh * num_keys + j] : offsets[bh * num_keys + j + 1]]``, in increasing
    order. A counting sort on int32 throughout: the histogram of the columns (``bincount``), offsets
    by its exclusive prefix sum, and the stable placement of each entry after the entries of lower
    columns and of earlier rows by a stable sort of the int32 column keys (``bh * num_keys + j``; on
    CUDA a radix sort over 32-bit keys, linear in the entries; no 64-bit keys). The same indices
    always give the same map, so the key-major backward adds in a fixed order."""
    batch, heads, num_rows, num_selected = indices.shape
    bh = batch * heads
    per_head = num_rows * num_selected
    entries = bh * per_head
    if max(entries, bh * num_keys) >= 2**31:
        raise ValueError(f"{entries} selected entries exceed the int32 selection map")
    column = indices.reshape(bh, per_head).to(torch.int32)
    if bh > 1:
        base = torch.arange(0, bh * num_keys, num_keys, device=indices.device, dtype=torch.int32)
        column = column + base[:, None]
    column = column.reshape(-1)
    offsets = torch.zeros(bh * num_keys + 1, dtype=torch.int32, device=indices.device)
    if entries == 0:
        return offsets, torch.zeros(0, dtype=torch.int32, device=indices.device)
    counts = torch.bincount(column, minlength=bh * num_keys)
    torch.cumsum(counts, dim=0, dtype=torch.int32, out=offsets[1:])
    order = torch.sort(column, stable=True).indices.to(torch.int32)  # entry ids < 2**31
    return offsets, (order % per_head) // num_selected


def topk_attention_dkdv_grid(
    batch: int, heads: int, num_keys: int, head_dim: int, interpret: bool = False
) -> tuple[int]:
    """The key-major backward: ``B * H * ceil(Nk / BLOCK_N)`` programs on axis 0."""
    return topk_attention_grid(batch, heads, num_keys, sparse_tile(head_dim, True, interpret).block_m)


def topk_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, without atomics: dq query-major, dk and dv key-major over the selection map.
    The same inputs give bit-identical gradients on every run."""
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    dense = indices.shape[-1] == 0
    num_selected = num_keys if dense else indices.shape[-1]
    dq = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, num_keys, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, heads, num_keys, head_dim), dtype=v.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    interpret = _interpret(q)
    tile = sparse_tile(head_dim, True, interpret)
    lse = lse.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # sum_j p_j dp_j per query
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    indices = indices.contiguous()
    _sparse_backward_dq_kernel[topk_attention_backward_grid(batch, heads, num_queries, head_dim, interpret)](
        q, k, v, grad_out, lse, delta, indices, dq, num_queries, num_selected, heads, scale, *strides,
        DENSE=dense, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, num_warps=tile.num_warps,
    )  # fmt: skip
    if dense:
        offsets = rows = torch.zeros(1, dtype=torch.int32, device=q.device)
    else:
        offsets, rows = selection_map(indices, num_keys)
    _sparse_backward_dkdv_kernel[topk_attention_dkdv_grid(batch, heads, num_keys, head_dim, interpret)](
        q, k, v, grad_out, lse, delta, offsets, rows, dk, dv, num_queries, num_keys, heads, scale, *strides,
        DENSE=dense, HEAD_DIM=head_dim, BLOCK_N=tile.block_m, num_warps=tile.num_warps,
    )  # fmt: skip
    return dq, dk, dv


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_SCALARS = {"scale": "fp32"}


def _topks() -> Iterator[int]:
    """One topk per selection tile class: BLOCK_N = max(32, next_power_of_2(topk)) up to TRITON_MAX_TOPK."""
    topk = 32
    while topk <= TRITON_MAX_TOPK:
        yield topk
        topk *= 2


def launch_configs() -> Iterator[KernelLaunch]:
    """Every (kernel, signature, constexprs, warps, stages) the launchers can choose on a GPU: every
    dtype, head size, selection tile class (from selection_tile) and gather tile (from sparse_tile),
    sparse and dense."""
    for dtype, name in _DTYPES.items():
        data = f"*{name}"
        pointers = {
            "q_ptr": data, "k_ptr": data, "v_ptr": data, "out_ptr": data, "grad_out_ptr": data,
            "dq_ptr": data, "dk_ptr": data, "dv_ptr": data, "idx_ptr": "*i32", "lse_ptr": "*fp32",
            "delta_ptr": "*fp32", "offsets_ptr": "*i32", "qlist_ptr": "*i32", "cand_ptr": "*i64",
            "scores_ptr": "*fp32",
        }  # fmt: skip
        for head_dim in SUPPORTED_HEAD_DIMS:
            tags = {"dtype": name, "head_dim": head_dim}
            for topk in _topks():
                tile = selection_tile(topk, head_dim, dtype)
                constexprs = _selection_constexprs(tile, head_dim, dtype, interpret=False)
                yield KernelLaunch(
                    _select_topk_kernel,
                    kernel_signature(_select_topk_kernel, constexprs, pointers, _SCALARS),
                    constexprs, tile.num_warps, tile.num_stages,
                    label=f"select {name} D={head_dim} topk<={topk}",
                    tags={**tags, "topk": topk},
                )  # fmt: skip
            for kernel, backward in (
                (_sparse_forward_kernel, False),
                (_sparse_backward_dq_kernel, True),
                (_sparse_backward_dkdv_kernel, True),
            ):
                for dense in (False, True):
                    tile = sparse_tile(head_dim, backward)
                    if kernel is _sparse_forward_kernel and not dense:
                        tile = given_scores_tile(head_dim)
                    if kernel is _sparse_backward_dkdv_kernel:
                        blocks = {"BLOCK_N": tile.block_m}
                        label = "backward dk/dv"
                    elif kernel is _sparse_backward_dq_kernel:
                        blocks = {"BLOCK_M": tile.block_m}
                        label = "backward dq"
                    else:
                        blocks = {"BLOCK_M": tile.block_m, "BLOCK_K": tile.block_n}
                        label = "forward"
                    constexprs = {"DENSE": dense, "HEAD_DIM": head_dim, **blocks}
                    if kernel is _sparse_forward_kernel:  # the sparse forward reads the selection's scores
                        constexprs = {
                            "DENSE": dense,
                            "GIVEN_SCORES": not dense,
                            "HEAD_DIM": head_dim,
                            **blocks,
                        }
                    yield KernelLaunch(
                        kernel, kernel_signature(kernel, constexprs, pointers, _SCALARS), constexprs,
                        tile.num_warps, tile.num_stages,
                        label=f"{label} {name} D={head_dim}{' dense' if dense else ''}",
                        tags={**tags, "dense": dense},
                    )  # fmt: skip
