"""Sample inputs of every op in ``fastvision.ops.OPS``, for the shared harness (test_op_contract.py).

Each op lists, per dtype, samples with an odd shape, a non-contiguous input and an empty input;
inputs are fresh random values from seeds that are the same in every process. An op declared in
``OPS`` without samples here fails the harness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from conftest import DEVICE

from fastvision.sparse import SparseTensor


@dataclass
class Sample:
    """Arguments of the public op; ``grad`` names the positions of the floating inputs to
    differentiate; ``scale`` and ``grad_scale`` multiply the per-dtype tolerances."""

    label: str
    args: tuple
    grad: tuple[int, ...]
    scale: float = 1.0
    grad_scale: float = 2.0
    kwargs: dict = field(default_factory=dict)


def random(shape, dtype, seed, scale=1.0, shift=0.0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=DEVICE, dtype=dtype)


def _geglu(dtype):
    wide = random((6, 5, 64), dtype, 2, scale=2.0)
    return [
        Sample("odd-erf", (random((5, 3, 26), dtype, 1, scale=2.0), "none"), (0,)),
        Sample("odd-tanh", (random((5, 3, 26), dtype, 1, scale=2.0), "tanh"), (0,)),
        Sample("strided", (wide[:, :, ::2], "tanh"), (0,)),
        Sample("empty", (random((0, 8), dtype, 3), "none"), (0,)),
    ]


def _add_layer_norm(dtype):
    def args(shape, seed, params=True):
        x, residual = random(shape, dtype, seed), random(shape, dtype, seed + 1, shift=3.0)
        if not params:
            return x, residual
        weight = random(shape[-1:], dtype, seed + 2, scale=0.5, shift=1.0)
        return x, residual, weight, random(shape[-1:], dtype, seed + 3, scale=0.5)

    x, residual, weight, bias = args((6, 5, 33), 20)
    # The reference rounds x + residual to the storage dtype before normalizing; allow for it.
    scale = 1.0 if dtype == torch.float32 else 4.0
    return [
        Sample("odd", args((5, 3, 7), 10), (0, 1, 2, 3), scale, 4 * scale),
        Sample("no-params", args((4, 129), 12, params=False), (0, 1), scale, 4 * scale),
        Sample(
            "transposed",
            (x.transpose(0, 1), residual.transpose(0, 1).contiguous(), weight, bias),
            (0, 1, 2, 3), scale, 4 * scale,
        ),
        Sample("empty", args((0, 16), 14), (0, 1, 2, 3)),
        # return_residual: (out, x + residual), gradients through both outputs.
        Sample("residual-out", (*args((4, 3, 20), 16), 1e-5, True), (0, 1, 2, 3), scale, 4 * scale),
    ]


def _topk_attention(dtype):
    def qkv(batch, heads, nq, nk, dim, seed):
        return (
            random((batch, heads, nq, dim), dtype, seed),
            random((batch, heads, nk, dim), dtype, seed + 1),
            random((batch, heads, nk, dim), dtype, seed + 2),
        )

    q, k, v = qkv(2, 3, 11, 11, 16, 40)
    return [
        Sample("odd", (*qkv(1, 2, 13, 21, 16, 30), 5), (0, 1, 2), 2.0, 4.0),
        Sample("dense", (*qkv(1, 2, 9, 7, 32, 33), 7), (0, 1, 2), 2.0, 4.0),
        Sample("transposed", (*(t.transpose(1, 2) for t in (q, k, v)), 4), (0, 1, 2), 2.0, 4.0),
        Sample("empty", (*qkv(1, 2, 0, 5, 16, 36), 3), (0, 1, 2)),
    ]


def _block_topk_attention(dtype):
    def qkv(batch, heads, nq, nk, dim, seed):
        return (
            random((batch, heads, nq, dim), dtype, seed),
            random((batch, heads, nk, dim), dtype, seed + 1),
            random((batch, heads, nk, dim), dtype, seed + 2),
        )

    q, k, v = qkv(2, 40, 3, 3, 16, 140)  # [B, N, H, D] storage
    return [
        # Nq != Nk, neither a multiple of the block: 3 query blocks pick 2 of 4 key blocks.
        Sample("odd", (*qkv(1, 2, 37, 50, 16, 130), 2, 16), (0, 1, 2), 2.0, 4.0),
        Sample("dense", (*qkv(1, 2, 9, 40, 32, 133), 2, 32), (0, 1, 2), 2.0, 4.0),
        # causal, Nq > Nk: query block 0 has one eligible block of the 2 asked, block 3 sees all 3.
        Sample("causal", (*qkv(1, 2, 50, 37, 16, 137), 2, 16, None, True), (0, 1, 2), 2.0, 4.0),
        Sample("transposed", (*(t.transpose(1, 2) for t in (q, k, v)), 1, 16), (0, 1, 2), 2.0, 4.0),
        Sample("empty", (*qkv(1, 2, 0, 5, 16, 136), 1, 16), (0, 1, 2)),
    ]


def _sparse_map(batch, height, width, channels, density, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    coords = (torch.rand(batch, height, width, generator=generator) < density).nonzero()
    return coords.to(DEVICE), random((coords.shape[0], channels), dtype, seed + 1, scale=3.0)


def _sparse_max_pool2d(dtype):
    coords, feats = _sparse_map(2, 9, 11, 5, 0.4, dtype, 50)
    wide_coords, wide = _sparse_map(2, 7, 8, 12, 0.5, dtype, 52)
    return [
        Sample("odd-k2s2", (coords, feats, 2), (1,)),
        Sample("overlap-k3s2", (coords, feats, 3, 2), (1,)),
        Sample("strided", (wide_coords, wide[:, ::2], (2, 3), (1, 2), (7, 8)), (1,)),
        Sample("empty", (coords[:0], feats[:0], 2), (1,)),
    ]


def _sparse_conv2d(dtype):
    def conv(batch, cin, cout, height, width, density, seed, strided=False):
        generator = torch.Generator().manual_seed(seed)
        active = torch.rand(batch, 1, height, width, generator=generator) < density
        dense = torch.randn(batch, cin, height, width, generator=generator) * active
        x = SparseTensor.from_dense(dense.to(device=DEVICE, dtype=dtype))
        feats = x.feats
        if strided:
            feats = random((x.num_sites, 2 * cin), dtype, seed + 3)[:, ::2]
        weight = random((9, cin, cout), dtype, seed + 1, scale=(9 * cin) ** -0.5)
        return feats, x.kernel_map(3), weight, random((cout,), dtype, seed + 2)

    half = dtype in (torch.float16, torch.bfloat16)
    # Half precision rounds each offset's GEMM output once before the float32 sum over offsets.
    scale = 6.0 if half else 1.0
    return [
        Sample("odd", conv(2, 3, 5, 9, 11, 0.4, 60), (0, 2, 3), scale, 4 * scale),
        Sample("strided", conv(1, 6, 4, 7, 9, 0.5, 64, strided=True), (0, 2, 3), scale, 4 * scale),
        # Every offset present; channel counts that are no multiple of a vector or register tile.
        Sample("dense-odd-channels", conv(1, 13, 19, 5, 6, 1.0, 66), (0, 2, 3), scale, 4 * scale),
        Sample("empty", conv(1, 3, 4, 5, 5, 0.0, 68), (0, 2, 3)),
    ]


def _masked_gather(dtype):
    def inputs(batch, channels, height, width, ratio, seed):
        generator = torch.Generator().manual_seed(seed)
        mask = (torch.rand(batch, height, width, generator=generator) < ratio).to(DEVICE)
        return random((batch, channels, height, width), dtype, seed + 1), mask

    x, mask = inputs(3, 5, 7, 9, 0.6, 70)
    channels_last = x.to(memory_format=torch.channels_last)
    # The first sample gives max_count: the form that compiles and exports without a host sync.
    return [
        Sample("max-count", (*inputs(4, 3, 6, 5, 0.5, 72), 9), (0,)),
        Sample("odd", (*inputs(3, 5, 7, 9, 0.6, 70), None), (0,)),
        Sample("channels-last", (channels_last, mask, 40), (0,)),
        Sample("empty", (*inputs(2, 4, 3, 3, 0.0, 74), None), (0,)),
    ]


def _grn(dtype):
    def inputs(batch, height, width, channels, seed, masked):
        x = random((batch, height, width, channels), dtype, seed)
        gamma = random((channels,), dtype, seed + 1, scale=0.5)
        beta = random((channels,), dtype, seed + 2, scale=0.5)
        if not masked:
            return x, gamma, beta
        generator = torch.Generator().manual_seed(seed + 3)
        mask = (torch.rand(batch, height, width, generator=generator) < 0.4).to(DEVICE)
        return x, gamma, beta, 1e-6, mask

    x, gamma, beta = inputs(2, 6, 5, 24, 80, False)
    # Gx sums squares over every site: allow for the longer reduction in half precision.
    scale = 1.0 if dtype == torch.float32 else 2.0
    return [
        Sample("odd", inputs(2, 5, 7, 13, 82, False), (0, 1, 2), scale, 4 * scale),
        Sample("masked", inputs(3, 4, 6, 9, 84, True), (0, 1, 2), scale, 4 * scale),
        Sample("nchw-view", (x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), gamma, beta),
               (0, 1, 2), scale, 4 * scale),  # fmt: skip
        Sample("empty", inputs(0, 3, 3, 8, 86, False), (0, 1, 2)),
    ]


def _selective_scan(dtype):
    def inputs(batch, dim, length, state, bc, seed, extras=True):
        u = random((batch, dim, length), dtype, seed)
        delta = random((batch, dim, length), dtype, seed + 1, scale=0.5)
        A = -torch.rand(dim, state, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE) - 0.1
        shape = {"fixed": (dim, state), "varying": (batch, state, length)}.get(bc, (batch, 2, state, length))
        B, C = random(shape, dtype, seed + 3), random(shape, dtype, seed + 4)
        if not extras:
            return u, delta, A, B, C
        D = random((dim,), torch.float32, seed + 5)
        z = random((batch, dim, length), dtype, seed + 6)
        bias = random((dim,), torch.float32, seed + 7, scale=0.1)
        return u, delta, A, B, C, D, z, bias, True, True

    u, delta, A, B, C = inputs(2, 6, 9, 4, "varying", 96, extras=False)
    grouped = inputs(2, 4, 7, 3, "grouped", 99)
    one_group_c = inputs(2, 4, 7, 3, "varying", 99)[4]
    # Float32 state carried over L steps, N products summed per step (and more in the backward).
    fwd, bwd = 4.0, 8.0
    every = (0, 1, 3, 4, 5, 6, 7)
    return [
        Sample("varying-full", inputs(2, 4, 11, 3, "varying", 90), every, fwd, bwd),
        Sample("fixed", inputs(1, 5, 7, 2, "fixed", 92, extras=False), (0, 1, 3, 4), fwd, bwd),
        Sample("grouped", inputs(2, 4, 6, 3, "grouped", 94), every, fwd, bwd),
        Sample("strided", (u.mT.contiguous().mT, delta, A, B, C), (0, 1, 3, 4), fwd, bwd),
        Sample("empty", inputs(0, 3, 5, 2, "varying", 98, extras=False), (0, 1, 3, 4)),
        Sample("grouped-reverse", (*inputs(2, 4, 6, 3, "grouped", 94), True), every, fwd, bwd),
        # B in 2 groups, C varying (1 group): each read with its own grouping; reversed, odd L.
        Sample("mixed-groups-reverse", (*grouped[:4], one_group_c, *grouped[5:], True), every, fwd, bwd),
    ]


SAMPLES: dict[str, Callable[[torch.dtype], list[Sample]]] = {
    "geglu": _geglu,
    "add_layer_norm": _add_layer_norm,
    "topk_attention": _topk_attention,
    "block_topk_attention": _block_topk_attention,
    "sparse_max_pool2d": _sparse_max_pool2d,
    "sparse_conv2d": _sparse_conv2d,
    "masked_gather": _masked_gather,
    "grn": _grn,
    "selective_scan": _selective_scan,
}
