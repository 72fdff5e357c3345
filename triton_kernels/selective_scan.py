"""Selective scan in Triton: chunked scans with the state on chip, carried across chunks.

Each program owns ``BLOCK_D`` channels of one sample and walks time in chunks of ``BLOCK_L`` steps.
Inside a chunk the recurrence ``h_t = a_t h_{t-1} + b_t`` (``a_t = exp(dt_t A)``, ``b_t = dt_t u_t B_t``)
is one ``tl.associative_scan`` over ``[BLOCK_D, N, BLOCK_L]`` with the combine
``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``; the state entering the chunk joins as
``h = A_cum h_in + b_cum``, and the chunk's last column carries on. Steps past ``L`` are the identity
(``a = 1, b = 0``), so the last column is always the state at the chunk's last real step.

Backward, per program: a first pass over the chunks writes the state entering each chunk to a
workspace (``N / BLOCK_L`` floats per step and channel, freed on return: nothing of size ``L x N`` is
kept between forward and backward). A second pass walks the chunks backwards: it rebuilds
``h_{t-1}`` from the chunk's entering state with a scan of the inputs shifted by one step, runs the
reverse scan ``g_t = a_{t+1} g_{t+1} + C_t dy_t`` (``g``: the gradient of the loss by ``h_t``) with
the gradient carried in from the following chunk, and forms every input gradient from ``g``,
``h_{t-1}`` and ``h_t``. Per-channel gradients (A, D, delta_bias, fixed B and C) go to per-sample
partials; gradients of varying B and C sum over the channels of a group with float32 atomics.

FLOPs per step and channel: about ``6 N`` forward (exp, scan, readout) and ``20 N`` backward.
Bytes: each input and output element once per pass (the backward reads the inputs twice).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance, interpreting, kernel_signature

# Local memory found by compiling launch_configs() for sm_90: 8-byte stack frames in some
# configurations even at 80 registers (so not register pressure: the scans' lowering), and up to 24
# bytes in the backward at N <= 4 with fixed B and C. Touched once per chunk, not per step; to
# revisit with GPU timings.
SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    "selective_scan_forward_kernel": SpillAllowance(8, "8-byte stack frames at N <= 4 (scan lowering)"),
    "selective_scan_backward_kernel": SpillAllowance(
        24, "8-byte stack frames at several N (scan lowering), 16-24 bytes at N <= 4 with fixed B and C"
    ),
}
MAX_STATE = 64


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chunk_inputs(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok, times,
    batch_index, length, state, channels_per_group, num_groups,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, B_FIXED: tl.constexpr,
):  # fmt: skip
    """``(dt, raw, u, decay, drive)`` of the steps ``times`` (``[BLOCK_L]``; outside ``[0, L)`` the
    identity step): ``dt, raw, u`` ``[BLOCK_D, BLOCK_L]``, ``decay, drive`` ``[BLOCK_D, BLOCK_N,
    BLOCK_L]``."""
    time_ok = (times >= 0) & (times < length)
    both = dim_ok[:, None] & time_ok[None, :]
    offsets = row[:, None] + times[None, :]
    u = tl.load(u_ptr + offsets, mask=both, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + offsets, mask=both, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + dims, mask=dim_ok, other=0.0)[:, None]
    if SOFTPLUS:
        dt = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))
    else:
        dt = raw
    dt = tl.where(both, dt, 0.0)
    a_mask = dim_ok[:, None] & state_ok[None, :]
    a = tl.load(A_ptr + dims[:, None] * state + states[None, :], mask=a_mask, other=0.0)
    decay = tl.exp(dt[:, None, :] * a[:, :, None])
    b_val = _load_bc(B_ptr, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
                     channels_per_group, num_groups, B_FIXED)  # fmt: skip
    drive = (dt * u)[:, None, :] * b_val
    return dt, raw, u, decay, drive


@triton.jit
def _load_bc(
    ptr, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
    channels_per_group, num_groups, FIXED: tl.constexpr,
):  # fmt: skip
    """B or C at ``times``: ``[BLOCK_D, BLOCK_N, BLOCK_L]`` (fixed: the same for every step)."""
    mask = dim_ok[:, None, None] & state_ok[None, :, None] & time_ok[None, None, :]
    if FIXED:
        value = tl.load(ptr + dims[:, None, None] * state + states[None, :, None], mask=mask, other=0.0)
    else:
        groups = (batch_index * num_groups + dims // channels_per_group).to(tl.int64)
        offsets = (groups[:, None, None] * state + states[None, :, None]) * length + times[None, None, :]
        value = tl.load(ptr + offsets, mask=mask, other=0.0)
    return value.to(tl.float32)


@triton.jit
def _last_column(x, times, last):
    return tl.sum(tl.where(times[None, None, :] == last, x, 0.0), axis=2)


@triton.jit
def selective_scan_forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    dim, length, state, channels_per_group, num_groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    dim_blocks = tl.cdiv(dim, BLOCK_D)
    batch_index = tl.program_id(0) // dim_blocks
    dims = (tl.program_id(0) % dim_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    states = tl.arange(0, BLOCK_N)
    state_ok = states < state
    row = (batch_index.to(tl.int64) * dim + dims) * length
    skip = tl.load(D_ptr + dims, mask=dim_ok, other=0.0) if HAS_D else tl.zeros((BLOCK_D,), dtype=tl.float32)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    steps = tl.arange(0, BLOCK_L)
    for start in range(0, length, BLOCK_L):
        times = start + steps
        time_ok = times < length
        _, _, u, decay, drive = _chunk_inputs(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok, times,
            batch_index, length, state, channels_per_group, num_groups, HAS_BIAS, SOFTPLUS, B_FIXED,
        )  # fmt: skip
        cum_decay, cum_drive = tl.associative_scan((decay, drive), 2, _combine)
        hs = cum_decay * h[:, :, None] + cum_drive
        c = _load_bc(C_ptr, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
                     channels_per_group, num_groups, C_FIXED)  # fmt: skip
        y = tl.sum(c * hs, axis=1) + skip[:, None] * u
        both = dim_ok[:, None] & time_ok[None, :]
        offsets = row[:, None] + times[None, :]
        if HAS_Z:
            zv = tl.load(z_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            y = y * zv / (1.0 + tl.exp(-zv))
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=both)
        h = _last_column(hs, steps, BLOCK_L - 1)
    last = (batch_index.to(tl.int64) * dim + dims)[:, None] * state + states[None, :]
    tl.store(last_ptr + last, h, mask=dim_ok[:, None] & state_ok[None, :])


@triton.jit
def selective_scan_backward_kernel(
    grad_out_ptr, grad_last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, entering_ptr,
    dim, length, state, channels_per_group, num_groups, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Outputs: du, ddelta, dz like u; per-sample partials dA [batch, dim, N], dD and dbias
    [batch, dim], fixed dB/dC [batch, dim, N]; varying dB/dC float32 [batch, G, N, L] (atomics)."""
    dim_blocks = tl.cdiv(dim, BLOCK_D)
    batch_index = tl.program_id(0) // dim_blocks
    dims = (tl.program_id(0) % dim_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    states = tl.arange(0, BLOCK_N)
    state_ok = states < state
    channel = batch_index.to(tl.int64) * dim + dims
    row = channel * length
    state_rows = channel[:, None] * state + states[None, :]
    state_mask = dim_ok[:, None] & state_ok[None, :]
    steps = tl.arange(0, BLOCK_L)
    # Pass 1: the state entering every chunk.
    workspace = entering_ptr + (channel[:, None] * num_chunks) * state + states[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, num_chunks):
        tl.store(workspace + chunk * state, h, mask=state_mask)
        _, _, _, decay, drive = _chunk_inputs(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok,
            chunk * BLOCK_L + steps, batch_index, length, state, channels_per_group, num_groups,
            HAS_BIAS, SOFTPLUS, B_FIXED,
        )  # fmt: skip
        cum_decay, cum_drive = tl.associative_scan((decay, drive), 2, _combine)
        h = _last_column(cum_decay * h[:, :, None] + cum_drive, steps, BLOCK_L - 1)
    # Pass 2: chunks in reverse, carrying dL/dh from the chunk after.
    skip = tl.load(D_ptr + dims, mask=dim_ok, other=0.0) if HAS_D else tl.zeros((BLOCK_D,), dtype=tl.float32)
    a = tl.load(A_ptr + dims[:, None] * state + states[None, :], mask=state_mask, other=0.0)
    carry = tl.load(grad_last_ptr + state_rows, mask=state_mask, other=0.0)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dC_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    d_skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for back in range(0, num_chunks):
        chunk = num_chunks - 1 - back
        times = chunk * BLOCK_L + steps
        time_ok = times < length
        both = dim_ok[:, None] & time_ok[None, :]
        offsets = row[:, None] + times[None, :]
        entering = tl.load(workspace + chunk * state, mask=state_mask, other=0.0)
        # h_{t-1}: the scan of the inputs shifted by one step, from the entering state.
        _, _, _, decay_prev, drive_prev = _chunk_inputs(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok,
            tl.where(steps == 0, -1, times - 1), batch_index, length, state, channels_per_group, num_groups,
            HAS_BIAS, SOFTPLUS, B_FIXED,
        )  # fmt: skip
        cum_decay, cum_drive = tl.associative_scan((decay_prev, drive_prev), 2, _combine)
        h_prev = cum_decay * entering[:, :, None] + cum_drive
        dt, raw, u, decay, drive = _chunk_inputs(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok, times,
            batch_index, length, state, channels_per_group, num_groups, HAS_BIAS, SOFTPLUS, B_FIXED,
        )  # fmt: skip
        h_t = decay * h_prev + drive
        c = _load_bc(C_ptr, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
                     channels_per_group, num_groups, C_FIXED)  # fmt: skip
        dy = tl.load(grad_out_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-zv))
            pre_gate = tl.sum(c * h_t, axis=1) + skip[:, None] * u
            dz = dy * pre_gate * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=both)
            dy = dy * zv * sig
        # alpha_t = a_{t+1}: the decay of the next step (1 past the last step).
        next_times = times + 1
        _, _, _, decay_next, _ = _chunk_inputs(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, row, dims, dim_ok, states, state_ok,
            tl.where(next_times < length, next_times, -1), batch_index, length, state, channels_per_group,
            num_groups, HAS_BIAS, SOFTPLUS, B_FIXED,
        )  # fmt: skip
        readout = c * dy[:, None, :]
        cum_alpha, cum_readout = tl.associative_scan((decay_next, readout), 2, _combine, reverse=True)
        g = cum_alpha * carry[:, :, None] + cum_readout
        b_val = _load_bc(B_ptr, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
                         channels_per_group, num_groups, B_FIXED)  # fmt: skip
        gh = g * decay * h_prev
        ddt = tl.sum(gh * a[:, :, None] + g * b_val * u[:, None, :], axis=1)
        dA += tl.sum(gh * dt[:, None, :], axis=2)
        d_drive = g * (dt * u)[:, None, :]
        du = dy * skip[:, None] + tl.sum(g * b_val, axis=1) * dt
        d_skip += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            d_raw = ddt / (1.0 + tl.exp(-raw))
        else:
            d_raw = ddt
        d_raw = tl.where(both, d_raw, 0.0)
        d_bias += tl.sum(d_raw, axis=1)
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=both)
        tl.store(ddelta_ptr + offsets, d_raw.to(ddelta_ptr.dtype.element_ty), mask=both)
        d_readout = h_t * dy[:, None, :]
        if B_FIXED:
            dB_fixed += tl.sum(d_drive, axis=2)
        else:
            _atomic_group_sum(dB_ptr, d_drive, dims, dim_ok, states, state_ok, times, time_ok, batch_index,
                              length, state, channels_per_group, num_groups)  # fmt: skip
        if C_FIXED:
            dC_fixed += tl.sum(d_readout, axis=2)
        else:
            _atomic_group_sum(dC_ptr, d_readout, dims, dim_ok, states, state_ok, times, time_ok, batch_index,
                              length, state, channels_per_group, num_groups)  # fmt: skip
        carry = _last_column(g, steps, 0)
    tl.store(dA_ptr + state_rows, dA, mask=state_mask)
    if B_FIXED:
        tl.store(dB_ptr + state_rows, dB_fixed, mask=state_mask)
    if C_FIXED:
        tl.store(dC_ptr + state_rows, dC_fixed, mask=state_mask)
    tl.store(dD_ptr + channel, d_skip, mask=dim_ok)
    tl.store(dbias_ptr + channel, d_bias, mask=dim_ok)


@triton.jit
def _atomic_group_sum(
    ptr, value, dims, dim_ok, states, state_ok, times, time_ok, batch_index, length, state,
    channels_per_group, num_groups,
):  # fmt: skip
    groups = (batch_index * num_groups + dims // channels_per_group).to(tl.int64)
    offsets = (groups[:, None, None] * state + states[None, :, None]) * length + times[None, None, :]
    mask = dim_ok[:, None, None] & state_ok[None, :, None] & time_ok[None, None, :]
    tl.atomic_add(ptr + offsets, value, mask=mask)


# --- tile choice (shared by the launchers and launch_configs) --------------------------------------


@dataclass(frozen=True)
class Tile:
    block_d: int
    block_n: int
    block_l: int
    num_warps: int


def scan_tile(state: int, backward: bool = False, interpret: bool = False) -> Tile:
    """``BLOCK_D x BLOCK_N x BLOCK_L`` of about 1024 (forward) or 512 (backward) states per
    program on a GPU: the six to ten live [D, N, L] float32 tensors stay in registers at 4 warps."""
    if state > MAX_STATE:
        raise ValueError(f"the triton selective scan takes N up to {MAX_STATE}, got {state}")
    block_n = triton.next_power_of_2(max(state, 2))
    if interpret:
        return Tile(4, block_n, 64, 4)
    budget = 512 if backward else 1024
    block_l = 32 if block_n <= 32 else 16
    block_d = max(1, budget // (block_n * block_l))
    return Tile(block_d, block_n, block_l, 4)


def scan_grid(batch: int, dim: int, tile: Tile) -> tuple[int]:
    """(sample x channel blocks,) on axis 0: up to 2**31 - 1 programs."""
    return (batch * triton.cdiv(dim, tile.block_d),)


# --- launchers ---------------------------------------------------------------------------------------


def _flags(B, C, D, z, delta_bias, delta_softplus):
    return {
        "HAS_D": D.numel() > 0, "HAS_Z": z.numel() > 0, "HAS_BIAS": delta_bias.numel() > 0,
        "SOFTPLUS": bool(delta_softplus), "B_FIXED": B.dim() == 2, "C_FIXED": C.dim() == 2,
    }  # fmt: skip


def _groups(B, C, dim):
    num_groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    return dim // num_groups, num_groups


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """``(out, last_state)``; ``B``/``C`` fixed ``[dim, N]`` or grouped ``[batch, G, N, L]``."""
    batch, dim, length = u.shape
    state = A.shape[1]
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.zeros((batch, dim, state), dtype=torch.float32, device=u.device)
    if out.numel() == 0:
        return out, last
    tile = scan_tile(state, interpret=interpreting())
    per_group, num_groups = _groups(B, C, dim)
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    z = z.contiguous()
    selective_scan_forward_kernel[scan_grid(batch, dim, tile)](
        u, delta, A, B, C, D, z, delta_bias, out, last, dim, length, state, per_group, num_groups,
        **_flags(B, C, D, z, delta_bias, delta_softplus),
        BLOCK_D=tile.block_d, BLOCK_N=tile.block_n, BLOCK_L=tile.block_l, num_warps=tile.num_warps,
    )  # fmt: skip
    return out, last


def selective_scan_backward(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Gradients of ``(u, delta, A, B, C, D, z, delta_bias)``, empty for an absent input."""
    batch, dim, length = u.shape
    state = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z.numel() else z.new_empty(0)
    dA = torch.zeros((batch, dim, state), **f32)
    d_skip, d_bias = torch.zeros((batch, dim), **f32), torch.zeros((batch, dim), **f32)
    dB = torch.zeros((batch, dim, state), **f32) if B.dim() == 2 else torch.zeros(B.shape, **f32)
    dC = torch.zeros((batch, dim, state), **f32) if C.dim() == 2 else torch.zeros(C.shape, **f32)
    if u.numel() > 0:
        tile = scan_tile(state, backward=True, interpret=interpreting())
        num_chunks = triton.cdiv(length, tile.block_l)
        entering = torch.empty((batch, dim, num_chunks, state), **f32)
        per_group, num_groups = _groups(B, C, dim)
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        z, grad_out, grad_last = z.contiguous(), grad_out.contiguous(), grad_last.contiguous()
        selective_scan_backward_kernel[scan_grid(batch, dim, tile)](
            grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias,
            du, ddelta, dz, dA, d_skip, d_bias, dB, dC, entering,
            dim, length, state, per_group, num_groups, num_chunks,
            **_flags(B, C, D, z, delta_bias, delta_softplus),
            BLOCK_D=tile.block_d, BLOCK_N=tile.block_n, BLOCK_L=tile.block_l, num_warps=tile.num_warps,
        )  # fmt: skip
    dB = (dB.sum(0) if B.dim() == 2 else dB).to(B.dtype)
    dC = (dC.sum(0) if C.dim() == 2 else dC).to(C.dtype)
    return (
        du, ddelta, dA.sum(0), dB, dC, d_skip.sum(0) if D.numel() else torch.empty(0, **f32), dz,
        d_bias.sum(0) if delta_bias.numel() else torch.empty(0, **f32),
    )  # fmt: skip


# --- every configuration the launchers can choose on a GPU (for the sm_90 budget check) ------------

_DTYPES = ("fp32", "fp16", "bf16")


_DATA_POINTERS = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "grad_out_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
_FLOAT_POINTERS = ("A_ptr", "D_ptr", "bias_ptr", "last_ptr", "grad_last_ptr", "dA_ptr", "dD_ptr", "dbias_ptr",
                   "dB_ptr", "dC_ptr", "entering_ptr")  # fmt: skip


def _states() -> Iterator[int]:
    state = 2
    while state <= MAX_STATE:
        yield state
        state *= 2


def launch_configs() -> Iterator[KernelLaunch]:
    """Forward and backward for every state-size class (powers of two up to MAX_STATE), dtype, and
    fixed or varying B and C, with D, z and delta_bias present and softplus on (the branches that
    hold the most registers), and the bare scan."""
    kernels = ((selective_scan_forward_kernel, False), (selective_scan_backward_kernel, True))
    for state, dtype, fixed, full, (kernel, backward) in itertools.product(
        _states(), _DTYPES, (True, False), (True, False), kernels
    ):
        tile = scan_tile(state, backward)
        flags = {"HAS_D": full, "HAS_Z": full, "HAS_BIAS": full, "SOFTPLUS": full, "B_FIXED": fixed,
                 "C_FIXED": fixed}  # fmt: skip
        constexprs = {**flags, "BLOCK_D": tile.block_d, "BLOCK_N": tile.block_n, "BLOCK_L": tile.block_l}
        data = f"*{dtype}"
        pointers = {**dict.fromkeys(_DATA_POINTERS, data), **dict.fromkeys(_FLOAT_POINTERS, "*fp32")}
        pointers.update(dict.fromkeys(("B_ptr", "C_ptr"), "*fp32" if dtype == "fp32" else data))
        label = f"{'backward' if backward else 'forward'} {dtype} N<={tile.block_n}"
        label += f" {'fixed' if fixed else 'varying'} B/C{'' if full else ' bare'}"
        signature = kernel_signature(kernel, constexprs, pointers)
        tags = {"dtype": dtype, "state": state}
        yield KernelLaunch(kernel, signature, constexprs, tile.num_warps, label=label, tags=tags)
