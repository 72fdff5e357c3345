"""Launch configurations for the kernel-budget check's own test: one that fits sm_90, one whose
shared memory does not (two fp32 128x256 dot operands held in shared memory: 256 KB > 227 KB)."""

from __future__ import annotations

import triton
import triton.language as tl
from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance


@triton.jit
def dot_tile_kernel(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rm[:, None] * BLOCK_K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BLOCK_N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], tl.dot(a, b))


SPILL_ALLOWANCE = {"dot_tile_kernel": SpillAllowance(0, "no spills expected")}


def launch_configs():
    signature = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}
    signature |= {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    yield KernelLaunch(
        dot_tile_kernel, signature, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, label="fits"
    )
    yield KernelLaunch(
        dot_tile_kernel,
        signature,
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256},
        8,
        label="too much shared",
    )
