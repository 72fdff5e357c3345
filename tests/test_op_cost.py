"""The cost model of every op (``OpSpec.cost``) and the per-call recorder the profiler uses.

Each op's cost on a small sample is checked against a value worked out by hand (the arithmetic is in
the comment beside it); an op in ``OPS`` without a cost model, or without a hand-checked case here,
fails. The recorder is off by default and does not break ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch
from op_samples import SAMPLES

import fastvision.ops._contract as contract
from fastvision.ops import OPS
from fastvision.ops._contract import OpCost, record_op_costs
from fastvision.sparse import SparseTensor


def _randn(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _geglu():
    x = _randn(3, 8)  # 12 outputs of 4 bytes: read 24, write 12 elements
    return [
        ((x, "none"), OpCost(3 * 12 * 4, 6 * 12)),  # 144 bytes, 72 FLOPs
        ((x, "tanh"), OpCost(144, 10 * 12)),  # 120 FLOPs
        ((x.half(), "none"), OpCost(3 * 12 * 2, 72)),  # 72 bytes
    ]


def _add_layer_norm():
    x, residual, weight, bias = _randn(2, 3, 5), _randn(2, 3, 5), _randn(5), _randn(5)
    # M = 6 rows, D = 5: 3 * 30 * 4 + 8 * 6 (mean, rstd) + 2 * 5 * 4 (weight, bias) = 448; 8 * 30 FLOPs
    return [
        ((x, residual, weight, bias), OpCost(448, 240)),
        ((x, residual), OpCost(408, 180)),  # no parameters: 360 + 48 bytes, 6 * 30 FLOPs
    ]


def _topk_attention():
    q, k, v = _randn(1, 2, 6, 16), _randn(1, 2, 10, 16), _randn(1, 2, 10, 16)
    # bytes: q 192 + k 320 + v 320 + out 192 = 1024 elements * 4; FLOPs 4 * B H Nq min(topk, Nk) D
    return [
        ((q, k, v, 3), OpCost(4096, 4 * 2 * 6 * 3 * 16)),  # 2304
        ((q, k, v, 20), OpCost(4096, 4 * 2 * 6 * 10 * 16)),  # topk above Nk = 10: 7680
    ]


def _block_topk_attention():
    q, k, v = _randn(1, 2, 32, 16), _randn(1, 2, 64, 16), _randn(1, 2, 64, 16)
    # bytes: (1024 + 2048 + 2048 + 1024) * 4; 2 blocks of 16 keys selected: 4 * 2 * 32 * 32 * 16 FLOPs
    return [
        ((q, k, v, 2, 16), OpCost(24576, 131072)),
        ((q, k, v, 8, 16), OpCost(24576, 4 * 2 * 32 * 64 * 16)),  # 128 keys asked, 64 exist: 262144
    ]


def _grn():
    x, gamma, beta = _randn(2, 3, 4, 5), _randn(5), _randn(5)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    # 120 elements: 2 * 120 * 4 bytes; 6 FLOPs each, 7 with the mask
    return [((x, gamma, beta), OpCost(960, 720)), ((x, gamma, beta, 1e-6, mask), OpCost(960, 840))]


def _masked_gather():
    x = _randn(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0].view(-1)[:5] = True  # 5 sites in sample 0
    mask[1, 3, 2:] = True  # 2 in sample 1
    # mask 32 + gathered 7 * 3 * 4 = 84 + slots 2 * M * (3 * 4 + 8 + 1) + counts 2 * 8 = 16
    return [
        ((x, mask), OpCost(32 + 84 + 2 * 5 * 21 + 16, 0)),  # M = 5 (the largest count): 342
        ((x, mask, 8), OpCost(32 + 84 + 2 * 8 * 21 + 16, 0)),  # 468
        ((x[:0], mask[:0]), OpCost(0, 0)),  # an empty batch
    ]


def _selective_scan():
    u, delta, z = _randn(1, 2, 3), _randn(1, 2, 3), _randn(1, 2, 3)
    A, B, C = -_randn(2, 4).abs(), _randn(1, 4, 3), _randn(1, 4, 3)
    # u, delta, z, out: 4 * 6 * 4 = 96 bytes; B, C: 2 * 12 * 4 = 96; 6 * N b d L = 6 * 4 * 6 = 144 FLOPs
    return [
        ((u, delta, A, B, C, None, z), OpCost(192, 144)),
        ((u, delta, A, B, C), OpCost(168, 144)),  # no z: 72 + 96
        ((u, delta, A, B, C), {"return_last_state": True}, OpCost(168 + 4 * 2 * 4, 144)),  # + state
    ]


def _sparse_conv2d():
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, :, 0, 0], dense[0, :, 0, 1], dense[0, :, 2, 2] = 1.0, 2.0, 3.0  # 3 sites
    x = SparseTensor.from_dense(dense)
    kernel_map = x.kernel_map(3)
    assert kernel_map.in_indices.numel() == 5  # 3 centres + (0,0)<->(0,1) both ways
    weight, bias = _randn(9, 2, 3), _randn(3)
    # feats 3*2 + weight 9*2*3 + out 3*3 = 69 elements * 4 = 276, + 5 pairs * 16 = 356; 2*5*2*3 FLOPs
    return [
        ((x.feats, kernel_map, weight), OpCost(356, 60)),
        ((x.feats, kernel_map, weight, bias), OpCost(356 + 12, 60)),
    ]


def _sparse_max_pool2d():
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 2, 2], [0, 3, 5]], dtype=torch.int32)
    feats = _randn(5, 4)
    # 2x2 windows (0,0) [3 sites], (1,1), (1,2): M = 3; N = 5, C = 4, 4-byte feats and coords
    # 5*4*4 + 3*5*4 + 3*4*4 + 3*3*4 = 80 + 60 + 48 + 36
    return [((coords, feats, 2), OpCost(224, 0)), ((coords[:0], feats[:0], 2), OpCost(0, 0))]


HAND_CHECKED = {
    "geglu": _geglu,
    "add_layer_norm": _add_layer_norm,
    "topk_attention": _topk_attention,
    "block_topk_attention": _block_topk_attention,
    "grn": _grn,
    "masked_gather": _masked_gather,
    "selective_scan": _selective_scan,
    "sparse_conv2d": _sparse_conv2d,
    "sparse_max_pool2d": _sparse_max_pool2d,
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_cost_matches_hand_computed_values(name):
    spec = OPS[name]
    assert spec.cost is not None, f"{name} declares no cost model (OpSpec.cost)"
    assert name in HAND_CHECKED, f"{name} has no hand-checked cost case in tests/test_op_cost.py"
    for case in HAND_CHECKED[name]():
        args, kwargs, expected = case if len(case) == 3 else (case[0], {}, case[1])
        cost = spec.cost_of(*args, **kwargs)
        assert isinstance(cost, OpCost)
        assert cost == expected, f"{name}{tuple(type(a).__name__ for a in args)}: {cost} != {expected}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_cost_of_every_sample_is_a_pair_of_non_negative_ints(name):
    """Odd, non-contiguous and empty samples of the contract harness all get a cost."""
    for sample in SAMPLES[name](torch.float32):
        cost = OPS[name].cost_of(*sample.args, **sample.kwargs)
        assert type(cost.bytes_moved) is int and type(cost.flops) is int, sample.label
        assert cost.bytes_moved >= 0 and cost.flops >= 0, sample.label


def test_recorder_is_off_by_default_and_records_inside():
    x = _randn(4, 6)
    assert contract._cost_records[0] is None
    OPS["geglu"](x)  # nothing to record into
    with torch.profiler.profile() as prof, record_op_costs() as records:
        OPS["geglu"](x, "tanh")
    assert contract._cost_records[0] is None
    assert records == [("geglu", OpCost(3 * 12 * 4, 10 * 12))]
    assert any(e.key == "fastvision.op.geglu" for e in prof.key_averages())


def test_recorder_does_not_break_fullgraph_compile():
    x = _randn(4, 6)
    expected = OPS["geglu"].reference(x, "none")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: OPS["geglu"](t) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected * 2)  # recorder off
    with record_op_costs() as records:
        torch.testing.assert_close(compiled(x), expected * 2)  # recorder on: a recompile, no break
    assert records == []  # compiled calls are not recorded
