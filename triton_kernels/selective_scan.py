"""Selective scan in Triton: each thread scans a run of consecutive steps in registers.

A program owns ``BLOCK_D`` channels of one sample (one warp each) and walks time in chunks of
``BLOCK_L`` steps: a ``[BLOCK_D, BLOCK_L]`` tile whose time axis is the memory-contiguous one, so the
loads give each thread ``BLOCK_L / 32`` consecutive steps (16 bytes of each input) and a warp the whole
chunk of one channel. Inside a chunk the program loops over the ``N`` states: for state ``n`` the
recurrence ``h_t = a_t h_{t-1} + b_t`` (``a_t = exp(dt_t A_n)``, ``b_t = dt_t u_t B_{t,n}``) is one
``tl.associative_scan`` along the tile's time axis with the combine ``(a1, b1), (a2, b2) -> (a1 a2,
a2 b1 + b2)``: a thread scans its run sequentially in registers, the runs combine across the warp's
lanes (five shuffle rounds per state and chunk, no barrier: the chunk never spans warps), and the
readout ``y_t += C_{t,n} h_t`` accumulates in registers. ``u``, ``dt`` and ``y`` stay in registers for
the chunk; per state only ``A_n`` and one row of ``B`` and ``C`` are loaded (a varying row shared by
the warp's steps, a fixed value by the whole row).

The state carried from one chunk to the next goes through global memory, not a reduction: the thread
holding a chunk's last step stores ``h`` (a predicated store) to the chunk-entering states
``[batch, dim, chunks + 1, N]`` float32 (slot ``k``: the state entering chunk ``k``; the last slot:
the final state), one barrier per chunk orders it before the next chunk's read, and the thread holding
the next chunk's first step folds it into that step (``b_0 + a_0 h_in``), so no product of decays ever
multiplies it (a zero state times an overflowed product would be NaN). Steps past ``L`` are the
identity (``a = 1, b = 0``). ``exp`` is ``exp2`` with log2(e) folded into A. ``REVERSE`` runs the
recurrence from ``L - 1`` down to 0: step ``s`` reads and writes time index ``L - 1 - s``
(``_time_index``), nothing is copied.

Backward: chunks in reverse, each chunk's inputs read once and its forward recomputed once, per state,
from the entering state saved in the states buffer (the launcher fills it with the forward kernel in
``STATES_ONLY`` mode: the scans without the readout). The gradient by the state, ``g_t = a_{t+1}
g_{t+1} + C_t dy_t``, is a reverse scan over ``(a_{t+1}, C_t dy_t)``: ``a_{t+1}`` from the delta of
the next step (loaded shifted by one, the chunk's inputs are not moved between threads), the gradient
carried in from the following chunk folded into the last step through a ``[batch, dim, N]`` buffer
(started at ``dL/dh_L``; store by the first step's thread, barrier, load by the last step's thread).
``a_t h_{t-1} = h_t - b_t`` needs no shifted state. Per-state gradients of a chunk (A, fixed B and C)
are reduced along the chunk and stored per chunk ``[batch, dim, chunks, N]``; varying B and C per
channel block ``[batch, dim / BLOCK_D, N, L]`` (summed over the program's channels on chip: the tile
divides every group); the launcher sums both in a fixed order, so the backward is bit-identical run
to run.

FLOPs per step, channel and state: about 6 forward (exp, scan, readout) and 20 backward.
Bytes: each input and output element once per pass, plus ``N / BLOCK_L`` floats of states per step and
channel; the backward reads the inputs of ``delta``, ``u``, ``B`` twice (once for the states).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Local memory found by compiling launch_configs() for sm_90. Triton 3.7 and later: none in the forward;
# 8 to 32-byte stack frames in the backward at 96 to 168 registers (24 to 32 with 16-bit varying B and C
# at gradient tiles of 32 to 128 states; a few LDL/STL per state and chunk, next to about 600
# instructions). Triton 3.6 lowers the chunk scan through shared memory at up to 128 registers: also 8
# bytes in the full 16-bit forward (two LDL/STL per state step of about 170 instructions). To revisit
# with GPU timings.
_TRITON_3_6 = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7)
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "selective_scan_backward_kernel": SpillAllowance(
        32, "8 to 32-byte stack frames, a few accesses per state and chunk"
    ),
}
if _TRITON_3_6:
    SPILL_ALLOWANCE["selective_scan_forward_kernel"] = SpillAllowance(
        8, "triton 3.6 only: 8 bytes in the full 16-bit forward, two accesses per state step"
    )
# The state loop runs inside the chunk, so N bounds no tile: any N the op takes.
MAX_STATE = 256
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chunk_index(chunk, steps, length, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """Time indices of chunk ``chunk`` of the recurrence, in memory order (``[BLOCK_L]``): forward, steps
    ``chunk * BLOCK_L + s``; reversed, the chunk ending ``chunk * BLOCK_L`` steps before ``L`` (its
    recurrence runs from the last index down, so a reversed chunk is still one contiguous,
    aligned load). Indices outside ``[0, L)`` are padding (identity steps)."""
    if REVERSE:
        index = length - (chunk + 1) * BLOCK_L + steps
    else:
        index = chunk * BLOCK_L + steps
    return index


@triton.jit
def _step_size(delta_ptr, bias, offsets, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(dt, raw)`` at ``offsets`` (``[BLOCK_D, BLOCK_L]``): 0 where ``mask`` is false (identity steps)."""
    raw = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    if SOFTPLUS:
        dt = tl.maximum(raw, 0.0) + LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(raw) * LOG2E))
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _state_rows(ptr, dims, index, batch_index, length, state, channels_per_group, num_groups,
                FIXED: tl.constexpr):  # fmt: skip
    """Pointers to B or C of state 0 for the chunk at time indices ``index``: ``[BLOCK_D, BLOCK_L]``
    (varying; state ``n`` is ``n * L`` further) or ``[BLOCK_D, 1]`` (fixed; ``n`` further), so the state
    loop adds one scalar per row; ``channels_per_group`` and ``num_groups`` are this tensor's own."""
    if FIXED:
        rows = ptr + (dims * state)[:, None]
    else:
        groups = (batch_index * num_groups + dims // channels_per_group).to(tl.int64)
        rows = ptr + (groups * state * length)[:, None] + index[None, :]
    return rows


@triton.jit
def _state_row(rows, n, length, dim_ok, both, FIXED: tl.constexpr):
    """B or C of state ``n`` from ``_state_rows``: ``[BLOCK_D, BLOCK_L]`` or ``[BLOCK_D, 1]`` float32."""
    if FIXED:
        value = tl.load(rows + n, mask=dim_ok[:, None], other=0.0)
    else:
        value = tl.load(rows + n * length, mask=both, other=0.0)
    return value.to(tl.float32)


@triton.jit
def _store_step(ptr, value, dim_ok, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, FIRST: tl.constexpr):
    """Store the chunk's first (``FIRST``) or last step of ``value [BLOCK_D, BLOCK_L]`` to ``ptr [BLOCK_D]``
    without a reduction: halving the tile by in-thread splits keeps the first or last step of each
    thread's run of ``RUN`` steps (``[BLOCK_D, BLOCK_L / RUN]``, one per lane, no data moves), and the
    lane holding the chunk's end stores it (a predicated store in the tile's own layout)."""
    RUN: tl.constexpr = BLOCK_L // 32 if BLOCK_L >= 32 else 1
    for level in tl.static_range(4):
        if (2 << level) <= RUN:
            even, odd = tl.split(tl.reshape(value, (BLOCK_D, BLOCK_L // (2 << level), 2)))
            value = even if FIRST else odd
    runs = tl.arange(0, BLOCK_L // RUN)
    end = 0 if FIRST else BLOCK_L // RUN - 1
    tl.store(ptr[:, None] + (runs - end)[None, :], value, mask=dim_ok[:, None] & (runs == end)[None, :])


@triton.jit
def selective_scan_forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    dim, length, state, b_per_group, b_groups, c_per_group, c_groups, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, REVERSE: tl.constexpr, STATES_ONLY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """``out`` like u (not written with ``STATES_ONLY``) and the chunk-entering states ``[batch, dim,
    num_chunks + 1, N]`` float32 (slot 0 the zero state; the last slot is h_L)."""
    dim_blocks = tl.cdiv(dim, BLOCK_D)
    batch_index = tl.program_id(0) // dim_blocks
    dims = (tl.program_id(0) % dim_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    channel = batch_index.to(tl.int64) * dim + dims
    row = channel * length
    steps = tl.arange(0, BLOCK_L)
    # [BLOCK_D, BLOCK_L] pointers of each channel's slot 0: only the first / last step's thread uses them.
    slot_d = states_ptr + channel * (num_chunks + 1) * state
    zero_l = steps[None, :] * 0
    slots = slot_d[:, None] + zero_l
    # The recurrence's first step of a chunk (reversed: the chunk's last index).
    enter = dim_ok[:, None] & (steps[None, :] == (BLOCK_L - 1 if REVERSE else 0))
    zero_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.load(bias_ptr + dims, mask=dim_ok, other=0.0) if HAS_BIAS else zero_d
    # Slot 0 holds the zero state, so the first chunk folds in its entering state like the others (no
    # per-chunk condition on the load); the thread that stores each element is the one that loads it.
    zero_tile = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for n in range(0, state):
        tl.store(slots + n, zero_tile, mask=enter)
    for chunk in range(0, num_chunks):
        index = _chunk_index(chunk, steps, length, BLOCK_L, REVERSE)
        both = dim_ok[:, None] & ((index >= 0) & (index < length))[None, :]
        offsets = row[:, None] + index[None, :]
        u = tl.load(u_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        dt, _ = _step_size(delta_ptr, bias, offsets, both, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        entering = slots + chunk * state
        b_rows = _state_rows(B_ptr, dims, index, batch_index, length, state, b_per_group, b_groups, B_FIXED)
        c_rows = _state_rows(C_ptr, dims, index, batch_index, length, state, c_per_group, c_groups, C_FIXED)
        for n in range(0, state):
            a2 = tl.load(A_ptr + dims * state + n, mask=dim_ok, other=0.0) * LOG2E
            decay = tl.exp2(dt * a2[:, None])
            drive = dtu * _state_row(b_rows, n, length, dim_ok, both, B_FIXED)
            # The entering state joins the chunk's first step (h_0 = a_0 h + b_0), so no product of decays
            # ever multiplies it: a zero state times an overflowed product would be NaN.
            h_in = tl.load(entering + n, mask=enter, other=0.0)
            drive = tl.where(enter, drive + decay * h_in, drive)
            _, h = tl.associative_scan((decay, drive), 1, _combine, reverse=REVERSE)
            # The chunk's last step (identity steps past the end keep the last real state) enters the next.
            _store_step(slot_d + (chunk + 1) * state + n, h, dim_ok, BLOCK_D, BLOCK_L, REVERSE)
            if not STATES_ONLY:
                y += h * _state_row(c_rows, n, length, dim_ok, both, C_FIXED)
        # Other threads of this program than those that stored them read the states back next chunk.
        tl.debug_barrier()
        if not STATES_ONLY:
            if HAS_D:
                y += tl.load(D_ptr + dims, mask=dim_ok, other=0.0)[:, None] * u
            if HAS_Z:
                zv = tl.load(z_ptr + offsets, mask=both, other=0.0).to(tl.float32)
                y = y * zv / (1.0 + tl.exp2(-zv * LOG2E))
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=both)


@triton.jit
def selective_scan_backward_kernel(
    grad_out_ptr, carry_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, length, state, b_per_group, b_groups, c_per_group, c_groups, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Inputs: ``carry`` [batch, dim, N] float32 holding dL/dh_L (overwritten: the gradient carried
    between chunks), ``states`` from the forward kernel. Outputs: du, ddelta, dz like u; per-sample
    partials dA and fixed dB/dC [batch, dim, N] (each state's sum lands in its column of a ``[BLOCK_D,
    BLOCK_N]`` register tile, stored once), dD and dbias [batch, dim]; varying dB/dC per channel block,
    float32 [batch, dim / BLOCK_D, N, L] (summed by the launcher)."""
    dim_blocks = tl.cdiv(dim, BLOCK_D)
    batch_index = tl.program_id(0) // dim_blocks
    block = (batch_index * dim_blocks + tl.program_id(0) % dim_blocks).to(tl.int64)
    dims = (tl.program_id(0) % dim_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    channel = batch_index.to(tl.int64) * dim + dims
    row = channel * length
    steps = tl.arange(0, BLOCK_L)
    zero_l = steps[None, :] * 0
    slots = states_ptr + (channel * (num_chunks + 1) * state)[:, None] + zero_l
    carry_d = carry_ptr + channel * state
    carried = carry_d[:, None] + zero_l
    columns = tl.arange(0, BLOCK_N)[None, :]
    enter = dim_ok[:, None] & (steps[None, :] == (BLOCK_L - 1 if REVERSE else 0))
    leave = dim_ok[:, None] & (steps[None, :] == (0 if REVERSE else BLOCK_L - 1))
    zero_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.load(bias_ptr + dims, mask=dim_ok, other=0.0) if HAS_BIAS else zero_d
    skip = tl.load(D_ptr + dims, mask=dim_ok, other=0.0) if HAS_D else zero_d
    d_skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dC_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for back in range(0, num_chunks):
        chunk = num_chunks - 1 - back
        index = _chunk_index(chunk, steps, length, BLOCK_L, REVERSE)
        both = dim_ok[:, None] & ((index >= 0) & (index < length))[None, :]
        offsets = row[:, None] + index[None, :]
        dt, _ = _step_size(delta_ptr, bias, offsets, both, HAS_BIAS, SOFTPLUS)
        # The next recurrence step's dt (0 past the end: the identity), for a_{t+1} of the reverse scan.
        next_index = index - 1 if REVERSE else index + 1
        next_ok = dim_ok[:, None] & ((next_index >= 0) & (next_index < length))[None, :]
        next_offsets = row[:, None] + next_index[None, :]
        dt_next, _ = _step_size(delta_ptr, bias, next_offsets, next_ok, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        dy_gated = tl.load(grad_out_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            dy_gated = dy_gated * zv / (1.0 + tl.exp2(-zv * LOG2E))
            pre_gate = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        # sum_n g A_n (h_t - b_t) and sum_n g B: dL/d dt is their sum plus u times the second.
        ddt = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        g_b = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        entering = slots + chunk * state
        b_rows = _state_rows(B_ptr, dims, index, batch_index, length, state, b_per_group, b_groups, B_FIXED)
        c_rows = _state_rows(C_ptr, dims, index, batch_index, length, state, c_per_group, c_groups, C_FIXED)
        for n in range(0, state):
            a = tl.load(A_ptr + dims * state + n, mask=dim_ok, other=0.0)
            a2 = a * LOG2E
            decay = tl.exp2(dt * a2[:, None])
            b_val = _state_row(b_rows, n, length, dim_ok, both, B_FIXED)
            drive = dtu * b_val
            # h_t by the scan from the entering state (folded into the first step), as in the forward.
            h_in = tl.load(entering + n, mask=enter, other=0.0)
            folded = tl.where(enter, drive + decay * h_in, drive)
            _, h = tl.associative_scan((decay, folded), 1, _combine, reverse=REVERSE)
            c = _state_row(c_rows, n, length, dim_ok, both, C_FIXED)
            if HAS_Z:
                pre_gate += c * h
            # g_t = a_{t+1} g_{t+1} + C_t dy_t; the gradient carried in joins the chunk's last step.
            decay_next = tl.exp2(dt_next * a2[:, None])
            readout = c * dy_gated
            carry = tl.load(carried + n, mask=leave, other=0.0)
            readout = tl.where(leave, readout + decay_next * carry, readout)
            _, g = tl.associative_scan((decay_next, readout), 1, _combine, reverse=not REVERSE)
            _store_step(carry_d + n, g, dim_ok, BLOCK_D, BLOCK_L, not REVERSE)
            # a_t h_{t-1} = h_t - b_t (the unfolded drive): the gradient through the decay.
            gh = g * (h - drive)
            ddt += gh * a[:, None]
            g_b += g * b_val
            column = columns == n
            dA += tl.where(column, tl.sum(gh * dt, axis=1)[:, None], 0.0)
            d_drive = g * dtu
            d_readout = h * dy_gated
            if B_FIXED:
                dB_fixed += tl.where(column, tl.sum(d_drive, axis=1)[:, None], 0.0)
            else:
                _store_block_sum(dB_ptr, d_drive, block, n, index, length, state)
            if C_FIXED:
                dC_fixed += tl.where(column, tl.sum(d_readout, axis=1)[:, None], 0.0)
            else:
                _store_block_sum(dC_ptr, d_readout, block, n, index, length, state)
        # The carried gradients were stored by other threads of this program than those that read them.
        tl.debug_barrier()
        # u, delta, dy and z are read again here (cache hits) rather than held through the state loop.
        u = tl.load(u_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        if HAS_Z:
            dy = tl.load(grad_out_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            zv = tl.load(z_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp2(-zv * LOG2E))
            pre_gate += skip[:, None] * u
            dz = dy * pre_gate * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=both)
        du = g_b * dt
        if HAS_D:
            du += dy_gated * skip[:, None]
            d_skip += tl.sum(dy_gated * u, axis=1)
        ddt += g_b * u
        if SOFTPLUS:
            raw = tl.load(delta_ptr + offsets, mask=both, other=0.0).to(tl.float32) + bias[:, None]
            ddt = ddt / (1.0 + tl.exp2(-raw * LOG2E))
        d_raw = tl.where(both, ddt, 0.0)
        d_bias += tl.sum(d_raw, axis=1)
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=both)
        tl.store(ddelta_ptr + offsets, d_raw.to(ddelta_ptr.dtype.element_ty), mask=both)
    state_rows = channel[:, None] * state + columns
    state_mask = dim_ok[:, None] & (columns < state)
    tl.store(dA_ptr + state_rows, dA, mask=state_mask)
    if B_FIXED:
        tl.store(dB_ptr + state_rows, dB_fixed, mask=state_mask)
    if C_FIXED:
        tl.store(dC_ptr + state_rows, dC_fixed, mask=state_mask)
    tl.store(dD_ptr + channel, d_skip, mask=dim_ok)
    tl.store(dbias_ptr + channel, d_bias, mask=dim_ok)


@triton.jit
def _store_block_sum(ptr, value, block, n, index, length, state):
    """The sum of ``value [BLOCK_D, BLOCK_L]`` over this program's channels (all in one group: the tile
    divides the group) at state ``n``, stored to its own row of partials ``[batch, dim_blocks, N, L]``:
    the launcher sums a group's rows in a fixed order, so the result is the same run to run (no atomics)."""
    time_ok = (index >= 0) & (index < length)
    tl.store(ptr + (block * state + n) * length + index, tl.sum(value, axis=0), mask=time_ok)


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_d: int
    block_l: int
    num_warps: int


def scan_tile(element_size: int, interpret: bool = False, group: int = 0) -> Tile:
    """``BLOCK_D`` channels, one warp each, x ``BLOCK_L`` steps: 32 lanes x 16 bytes of the input dtype
    (256 steps of 16-bit inputs, 128 of float32), so each thread loads and scans a run of consecutive
    steps and a chunk never spans warps (the scan needs no barrier). ``group`` > 0: BLOCK_D divides it
    (a backward program's channels then share one group of varying B and C, whose gradients it sums on
    chip). The chunk depends on the dtype only: the forward and backward tiles share their chunks."""
    if interpret:
        block_d, block_l = 2, 16
    else:
        block_d, block_l = 4, 32 * max(16 // element_size, 1)
    while group > 0 and group % block_d:
        block_d //= 2
    return Tile(block_d, block_l, block_d)


def scan_grid(batch: int, dim: int, tile: Tile) -> tuple[int]:
    """(sample x channel blocks,) on axis 0: up to 2**31 - 1 programs."""
    return (batch * triton.cdiv(dim, tile.block_d),)


def gradient_tile_states(state: int) -> int:
    """``BLOCK_N`` of the backward's per-state gradient tiles: N rounded up to a power of two, at least 16
    (smaller tiles would only add configurations)."""
    return max(16, triton.next_power_of_2(state))


def _check_state(state: int) -> None:
    if state > MAX_STATE:
        raise ValueError(f"the triton selective scan takes N up to {MAX_STATE}, got {state}")


# --- launchers ---------------------------------------------------------------------------------------


def _flags(B, C, D, z, delta_bias, delta_softplus, reverse):
    return {
        "HAS_D": D.numel() > 0, "HAS_Z": z.numel() > 0, "HAS_BIAS": delta_bias.numel() > 0,
        "SOFTPLUS": bool(delta_softplus), "B_FIXED": B.dim() == 2, "C_FIXED": C.dim() == 2,
        "REVERSE": bool(reverse),
    }  # fmt: skip


def _groups(B, C, dim):
    """``(B's channels per group, B's groups, C's channels per group, C's groups)``: each tensor has its
    own grouping (1 group of ``dim`` channels when fixed, where they are not read)."""
    b_groups = B.shape[1] if B.dim() == 4 else 1
    c_groups = C.shape[1] if C.dim() == 4 else 1
    return max(dim // b_groups, 1), b_groups, max(dim // c_groups, 1), c_groups


def _shared_group(B, C, groups) -> int:
    """The gcd of the channel counts of the varying B and C groups (0 when both are fixed)."""
    b_per_group, _, c_per_group, _ = groups
    return math.gcd(b_per_group if B.dim() == 4 else 0, c_per_group if C.dim() == 4 else 0)


def _group_sum(blocks: torch.Tensor, shape) -> torch.Tensor:
    """Per-block partials ``[batch, dim_blocks, N, L]`` -> ``[batch, G, N, L]``: each group's blocks summed
    in one fixed order (a reduction, not atomics)."""
    batch, groups, state, length = shape
    return blocks.view(batch, groups, blocks.shape[1] // groups, state, length).sum(2)


def _scan_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out=None):
    """Run the forward kernel: ``(out, states)``, states ``[batch, dim, chunks + 1, N]`` float32 (slot
    ``k`` enters chunk ``k``, the last is h_L); ``out=None``: the states only (no readout)."""
    batch, dim, length = u.shape
    state = A.shape[1]
    _check_state(state)
    tile = scan_tile(u.element_size(), interpret=interpreting())
    num_chunks = triton.cdiv(length, tile.block_l)
    states = torch.empty((batch, dim, num_chunks + 1, state), dtype=torch.float32, device=u.device)
    selective_scan_forward_kernel[scan_grid(batch, dim, tile)](
        u, delta, A, B, C, D, z, delta_bias, u if out is None else out, states,
        dim, length, state, *_groups(B, C, dim), num_chunks,
        **_flags(B, C, D, z, delta_bias, delta_softplus, reverse), STATES_ONLY=out is None,
        BLOCK_D=tile.block_d, BLOCK_L=tile.block_l, num_warps=tile.num_warps,
    )  # fmt: skip
    return out, states


def chunk_states_shape(batch: int, dim: int, length: int, state: int, element_size: int) -> tuple[int, ...]:
    """``[batch, dim, chunks + 1, N]``: the chunk-entering states the forward saves for the backward
    (chunks of the dtype's ``BLOCK_L``, which the forward and backward tiles share)."""
    chunk = scan_tile(element_size, interpret=interpreting()).block_l
    return (batch, dim, triton.cdiv(length, chunk) + 1, state)


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False):
    """``(out, last_state, chunk_states)``; ``B``/``C`` fixed ``[dim, N]`` or grouped ``[batch, G, N,
    L]``. ``chunk_states`` (``chunk_states_shape``) lets the backward skip the forward's states pass."""
    batch, dim, length = u.shape
    state = A.shape[1]
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        shape = chunk_states_shape(batch, dim, length, state, u.element_size())
        states = torch.zeros(shape, dtype=torch.float32, device=u.device)
        return out, torch.zeros((batch, dim, state), dtype=torch.float32, device=u.device), states
    u, delta, A, B, C, z = (t.contiguous() for t in (u, delta, A, B, C, z))
    out, states = _scan_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out)
    return out, states[:, :, -1].contiguous(), states


def selective_scan_backward(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, states=None
):
    """Gradients of ``(u, delta, A, B, C, D, z, delta_bias)``, empty for an absent input. ``states``: the
    forward's chunk states (``chunk_states_shape``); ``None`` or empty: recomputed by a states pass."""
    batch, dim, length = u.shape
    state = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z.numel() else z.new_empty(0)
    d_skip, d_bias = torch.zeros((batch, dim), **f32), torch.zeros((batch, dim), **f32)
    groups = _groups(B, C, dim)
    tile = scan_tile(u.element_size(), interpret=interpreting(), group=_shared_group(B, C, groups))
    dim_blocks = triton.cdiv(dim, tile.block_d)
    num_chunks = triton.cdiv(length, tile.block_l)
    # Every element of the partials is stored when the kernel runs.
    make = torch.empty if u.numel() > 0 else torch.zeros
    dA = make((batch, dim, state), **f32)

    def grad_of(bc):  # fixed: per-sample partials [batch, dim, N]; varying: per channel block
        if bc.dim() == 2:
            return make((batch, dim, state), **f32)
        return make((batch, dim_blocks, state, length), **f32)

    dB, dC = grad_of(B), grad_of(C)
    if u.numel() > 0:
        u, delta, A, B, C, z = (t.contiguous() for t in (u, delta, A, B, C, z))
        grad_out = grad_out.contiguous()
        if states is None or states.numel() == 0:
            _, states = _scan_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        states = states.contiguous()
        carry = grad_last.to(torch.float32).contiguous().clone()
        selective_scan_backward_kernel[scan_grid(batch, dim, tile)](
            grad_out, carry, u, delta, A, B, C, D, z, delta_bias, states,
            du, ddelta, dz, dA, d_skip, d_bias, dB, dC,
            dim, length, state, *groups, num_chunks,
            **_flags(B, C, D, z, delta_bias, delta_softplus, reverse),
            BLOCK_D=tile.block_d, BLOCK_L=tile.block_l, BLOCK_N=gradient_tile_states(state),
            num_warps=tile.num_warps,
        )  # fmt: skip
    dB = (dB.sum(0) if B.dim() == 2 else _group_sum(dB, B.shape)).to(B.dtype)
    dC = (dC.sum(0) if C.dim() == 2 else _group_sum(dC, C.shape)).to(C.dtype)
    return (
        du, ddelta, dA.sum(0), dB, dC, d_skip.sum(0) if D.numel() else torch.empty(0, **f32), dz,
        d_bias.sum(0) if delta_bias.numel() else torch.empty(0, **f32),
    )  # fmt: skip


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------


def _benchmark_launch(kernel, constexprs: dict) -> dict[str, int]:
    """Argument values of a launch at the benchmark's sizes (batch 4, dim 1024, L 4096, N 16, varying B
    and C in one group) on contiguous tensors from torch's allocator, as Triton specializes it: pointers
    16-byte aligned, ``length`` a multiple of 16 (the loads then give each thread 16 contiguous bytes;
    an L that is not a multiple of 16 compiles the general code, whose chunks span warps)."""
    length, dim, state = 4096, 1024, 16
    values = dict.fromkeys(_DATA_POINTERS + _FLOAT_POINTERS + ("B_ptr", "C_ptr"), 16)
    values.update(dim=dim, length=length, state=state, b_per_group=dim, b_groups=1, c_per_group=dim,
                  c_groups=1, num_chunks=length // constexprs["BLOCK_L"])  # fmt: skip
    return {k: v for k, v in values.items() if k in kernel.arg_names}


_DTYPES = ("fp32", "fp16", "bf16")
_ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


_DATA_POINTERS = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "grad_out_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
_FLOAT_POINTERS = ("A_ptr", "D_ptr", "bias_ptr", "states_ptr", "carry_ptr", "dA_ptr", "dD_ptr", "dbias_ptr",
                   "dB_ptr", "dC_ptr")  # fmt: skip


LAUNCH_SPECIALIZATION = {
    kernel.fn.__name__: functools.partial(_benchmark_launch, kernel)
    for kernel in (selective_scan_forward_kernel, selective_scan_backward_kernel)
}


def launch_configs() -> Iterator[KernelLaunch]:
    """Forward (with the readout, and the states-only pass of the backward) and backward for every
    dtype, fixed or varying B and C, with D, z and delta_bias present, softplus on and reversed (the
    branches that hold the most registers), and the bare forward-direction scan. N is a runtime loop
    bound; it sizes only the backward's per-state gradient tile (``BLOCK_N``, ``gradient_tile_states``:
    16 to 256)."""
    kernels = [
        (selective_scan_forward_kernel, "states", {"STATES_ONLY": True}),
        (selective_scan_forward_kernel, "forward", {"STATES_ONLY": False}),
    ]
    gradient_tiles = (16, 32, 64, 128, MAX_STATE)
    kernels += [(selective_scan_backward_kernel, f"backward N<={n}", {"BLOCK_N": n}) for n in gradient_tiles]
    for dtype, fixed, full, (kernel, name, extra) in itertools.product(
        _DTYPES, (True, False), (False, True), kernels
    ):
        tile = scan_tile(_ELEMENT_SIZE[dtype])
        # The full configurations run reversed (the index arithmetic of REVERSE on top of every branch).
        flags = {"HAS_D": full, "HAS_Z": full, "HAS_BIAS": full, "SOFTPLUS": full, "B_FIXED": fixed,
                 "C_FIXED": fixed, "REVERSE": full, **extra}  # fmt: skip
        constexprs = {**flags, "BLOCK_D": tile.block_d, "BLOCK_L": tile.block_l}
        data = f"*{dtype}"
        pointers = {**dict.fromkeys(_DATA_POINTERS, data), **dict.fromkeys(_FLOAT_POINTERS, "*fp32")}
        pointers.update(dict.fromkeys(("B_ptr", "C_ptr"), "*fp32" if dtype == "fp32" else data))
        label = f"{name} {dtype} L<={tile.block_l} {'fixed' if fixed else 'varying'} B/C"
        label += "" if full else " bare"
        signature = kernel_signature(kernel, constexprs, pointers)
        tags = {"dtype": dtype}
        yield KernelLaunch(kernel, signature, constexprs, tile.num_warps, label=label, tags=tags)
