"""block_topk_attention: what is specific to the op (the harness, test_op_contract.py, checks every
backend against the float64 reference on its samples, opcheck, compile, export): odd sizes, the
block tie rule, dense equivalence, the selected blocks, causal attention (SDPA's is_causal
alignment, block-level selection), determinism of the backward, poisoned outputs and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision._backend import why_unusable
from fastvision.ops import OPS
from fastvision.ops.block_topk_attention import (
    _block_means,
    block_selection_mask,
    block_topk_attention,
    block_topk_attention_reference,
)

BACKENDS = backend_params(OPS["block_topk_attention"].backends)
TRITON = [p for p in BACKENDS if p.id == "triton"]
TRITON_USABLE = why_unusable("triton", DEVICE) is None


def _random(shape, dtype, seed, device=DEVICE):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _inputs(batch, heads, num_queries, num_keys, head_dim, dtype, seed):
    return (
        _random((batch, heads, num_queries, head_dim), dtype, seed),
        _random((batch, heads, num_keys, head_dim), dtype, seed + 1),
        _random((batch, heads, num_keys, head_dim), dtype, seed + 2),
    )


def _check_forward_backward(
    q, k, v, topk_blocks, block_size, backend, scale=None, seed=0, grad_scale=4.0, causal=False
):
    dtype = q.dtype
    before = [t.clone() for t in (q, k, v)]
    grad_out = _random(q.shape, dtype, seed + 3, q.device)
    reference_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = block_topk_attention_reference(*reference_inputs, topk_blocks, block_size, scale, causal)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.double())
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with fastvision.use_backend(backend):
        out = block_topk_attention(*inputs, topk_blocks, block_size, scale, causal)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, scale=2.0)
    for name, grad, want, tensor in zip("qkv", grads, expected_grads, inputs, strict=True):
        assert grad.dtype == dtype and grad.shape == tensor.shape, name
        assert_close(grad, want, dtype, scale=grad_scale)
    for old, new in zip(before, (q, k, v), strict=True):
        assert torch.equal(old, new), "inputs must not be written"
    return out, grads


# (dtype, D, Nq, Nk, topk_blocks, block_size): odd lengths, Nq != Nk, partial last blocks.
CASES = [
    pytest.param(torch.float32, 16, 37, 50, 1, 16, id="f32-top1-bs16"),
    pytest.param(torch.float32, 32, 50, 37, 2, 16, id="f32-Nq>Nk"),
    pytest.param(torch.float32, 16, 70, 100, 3, 32, id="f32-bs32"),
    pytest.param(torch.float32, 64, 20, 150, 1, 64, id="f32-bs64"),
    pytest.param(torch.float32, 16, 40, 300, 2, 128, id="f32-bs128-partial"),
    pytest.param(torch.float32, 16, 37, 50, 4, 16, id="f32-topk=Nkb(dense)"),
    pytest.param(torch.float32, 16, 37, 50, 99, 16, id="f32-topk>Nkb(dense)"),
    pytest.param(torch.float32, 16, 1, 50, 2, 16, id="f32-single-query"),
    pytest.param(torch.float32, 128, 17, 33, 1, 16, id="f32-d128"),
    pytest.param(torch.float16, 32, 37, 50, 2, 16, id="f16"),
    pytest.param(torch.bfloat16, 16, 37, 50, 2, 16, id="bf16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "head_dim", "num_queries", "num_keys", "topk_blocks", "block_size"), CASES)
def test_matches_reference(backend, dtype, head_dim, num_queries, num_keys, topk_blocks, block_size):
    q, k, v = _inputs(
        1, 2, num_queries, num_keys, head_dim, dtype, seed=num_keys + 7 * topk_blocks + head_dim
    )
    _check_forward_backward(q, k, v, topk_blocks, block_size, backend)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 32), (32, 16)])
def test_triton_sub_block_tiles(backend, block_m, block_n, monkeypatch):
    """GPU tiles are smaller than the block (a program's queries and each step's keys are slices of
    one block): force such tiles under the interpreter too."""
    from fastvision.triton_kernels import block_topk_attention as kernels

    monkeypatch.setattr(kernels, "attention_tile", lambda *args, **kwargs: kernels.Tile(block_m, block_n, 4))
    for topk_blocks in (2, 9):  # sparse, dense
        q, k, v = _inputs(1, 2, 150, 201, 16, torch.float32, seed=topk_blocks)
        _check_forward_backward(q, k, v, topk_blocks, 64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_batch(backend):
    q, k, v = _inputs(2, 3, 19, 45, 16, torch.float32, seed=40)
    _check_forward_backward(q, k, v, 2, 16, backend, scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.7, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_negative_and_zero_scale(backend, scale, causal):
    """The Triton forward works in base 2 on |scale| (a negative scale negates q, exactly)."""
    q, k, v = _inputs(1, 2, 37, 50, 16, torch.float32, seed=41)
    _check_forward_backward(q, k, v, 2, 16, backend, scale=scale, causal=causal)


# --- causal ------------------------------------------------------------------------------------------

# (dtype, D, Nq, Nk, topk_blocks, block_size): Nq < Nk, Nq > Nk, Nq = Nk, partial last blocks,
# topk_blocks = 1, above some query blocks' eligible count, and >= the block count (dense causal).
CAUSAL_CASES = [
    pytest.param(torch.float32, 16, 37, 50, 1, 16, id="f32-top1-Nq<Nk"),
    pytest.param(torch.float32, 32, 70, 37, 2, 16, id="f32-Nq>Nk"),
    pytest.param(torch.float32, 16, 83, 83, 3, 16, id="f32-Nq=Nk"),
    pytest.param(torch.float32, 16, 100, 150, 3, 32, id="f32-bs32"),
    pytest.param(torch.float32, 64, 150, 130, 2, 64, id="f32-bs64"),
    pytest.param(torch.float32, 16, 300, 270, 1, 128, id="f32-bs128-partial"),
    pytest.param(torch.float32, 16, 37, 50, 4, 16, id="f32-topk=Nkb(dense)"),
    pytest.param(torch.float32, 16, 50, 37, 99, 16, id="f32-topk>Nkb(dense)-Nq>Nk"),
    pytest.param(torch.float32, 16, 1, 50, 2, 16, id="f32-single-query"),
    pytest.param(torch.float32, 128, 33, 17, 1, 16, id="f32-d128"),
    pytest.param(torch.float16, 32, 50, 37, 2, 16, id="f16"),
    pytest.param(torch.bfloat16, 16, 37, 50, 2, 16, id="bf16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_queries", "num_keys", "topk_blocks", "block_size"), CAUSAL_CASES
)
def test_causal_matches_reference(backend, dtype, head_dim, num_queries, num_keys, topk_blocks, block_size):
    q, k, v = _inputs(
        1, 2, num_queries, num_keys, head_dim, dtype, seed=3 * num_keys + 5 * topk_blocks + num_queries
    )
    _check_forward_backward(q, k, v, topk_blocks, block_size, backend, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_queries", "num_keys"), [(23, 40), (40, 23), (33, 33)])
def test_causal_dense_equals_sdpa_is_causal(backend, num_queries, num_keys):
    """Every block selected: SDPA's own causal path, upper-left aligned for Nq != Nk."""
    q, k, v = _inputs(1, 2, num_queries, num_keys, 32, torch.float32, seed=63 + num_queries)
    with fastvision.use_backend(backend):
        out = block_topk_attention(q, k, v, 9, 16, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_causal_reference_definition_by_hand():
    """Query block I picks its best key blocks among J <= I, query i attends to keys j <= i of them."""
    num_queries, num_keys, block_size, topk_blocks, scale = 45, 60, 16, 2, 0.3
    q, k, v = _inputs(1, 1, num_queries, num_keys, 16, torch.float64, seed=64)
    out = block_topk_attention_reference(q, k, v, topk_blocks, block_size, scale, causal=True)
    k_means = torch.stack([k[0, 0, j : j + block_size].mean(0) for j in range(0, num_keys, block_size)])
    for block, start in enumerate(range(0, num_queries, block_size)):
        q_mean = q[0, 0, start : start + block_size].mean(0)
        block_scores = scale * (k_means[: block + 1] @ q_mean)
        chosen = block_scores.argsort(descending=True, stable=True)[:topk_blocks].tolist()
        for i in range(start, min(num_queries, start + block_size)):
            keys = [j for b in sorted(chosen) for j in range(b * block_size, (b + 1) * block_size) if j <= i]
            weights = torch.softmax(scale * (k[0, 0, keys] @ q[0, 0, i]), dim=0)
            torch.testing.assert_close(out[0, 0, i], weights @ v[0, 0, keys])


def test_causal_selection_takes_eligible_blocks_only():
    q, k, _ = _inputs(2, 2, 100, 70, 16, torch.float64, seed=65)
    for topk_blocks in (1, 2, 3, 9):
        mask = block_selection_mask(q, k, topk_blocks, 16, 0.25, causal=True)
        num_query_blocks, num_key_blocks = mask.shape[-2:]
        for block in range(num_query_blocks):
            assert not mask[..., block, block + 1 :].any()
            assert (mask[..., block, :].sum(-1) == min(topk_blocks, block + 1, num_key_blocks)).all()


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("topk_blocks", [1, 3, 5])
def test_triton_causal_selected_blocks_equal_the_definition(topk_blocks):
    """Eligible blocks first, best first (ties: the lower block); the first min(S, I + 1) entries of
    query block I are its selection."""
    from fastvision.triton_kernels.block_topk_attention import select_blocks

    q, k, _ = _tied_inputs(seed=73, num_queries=100)
    indices = select_blocks(q, k, topk_blocks, 16, 0.25, causal=True)
    expected = block_selection_mask(q.double(), k.double(), topk_blocks, 16, 0.25, causal=True)
    for block in range(indices.shape[2]):
        eligible = min(topk_blocks, block + 1)
        chosen = indices[:, :, block, :eligible].long()
        got = torch.zeros(*chosen.shape[:2], 6, dtype=torch.bool).scatter_(-1, chosen, True)
        assert torch.equal(got, expected[:, :, block]), block


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 32), (32, 16)])
def test_triton_causal_sub_block_tiles(backend, block_m, block_n, monkeypatch):
    from fastvision.triton_kernels import block_topk_attention as kernels

    monkeypatch.setattr(kernels, "attention_tile", lambda *args, **kwargs: kernels.Tile(block_m, block_n, 4))
    for num_queries, num_keys, topk_blocks in ((150, 201, 2), (201, 150, 9)):  # sparse, dense
        q, k, v = _inputs(1, 2, num_queries, num_keys, 16, torch.float32, seed=topk_blocks + 7)
        _check_forward_backward(q, k, v, topk_blocks, 64, backend, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_sdpa(backend):
    q, k, v = _inputs(1, 2, 23, 40, 32, torch.float32, seed=60)
    with fastvision.use_backend(backend):
        out = block_topk_attention(q, k, v, 3, 16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_reference_definition_by_hand():
    """Query block I attends to exactly the keys of its selected blocks (an independent loop)."""
    q, k, v = _inputs(1, 1, 20, 45, 16, torch.float64, seed=61)
    block_size, topk_blocks, scale = 16, 2, 0.25
    out = block_topk_attention_reference(q, k, v, topk_blocks, block_size, scale)
    k_means = torch.stack([k[0, 0, j : j + block_size].mean(0) for j in range(0, 45, block_size)])
    for start in range(0, 20, block_size):
        q_mean = q[0, 0, start : start + block_size].mean(0)
        block_scores = scale * (k_means @ q_mean)
        chosen = sorted(block_scores.argsort(descending=True, stable=True)[:topk_blocks].tolist())
        keys = torch.cat([torch.arange(j * block_size, min(45, (j + 1) * block_size)) for j in chosen])
        for i in range(start, min(20, start + block_size)):
            weights = torch.softmax(scale * (k[0, 0, keys] @ q[0, 0, i]), dim=0)
            torch.testing.assert_close(out[0, 0, i], weights @ v[0, 0, keys])


def test_sparse_differs_from_dense():
    q, k, v = _inputs(1, 1, 32, 96, 16, torch.float64, seed=62)
    sparse = block_topk_attention_reference(q, k, v, 1, 16)
    assert (sparse - block_topk_attention_reference(q, k, v, 6, 16)).abs().max() > 1e-3


def test_block_means_of_partial_blocks():
    x = torch.arange(5 * 2, dtype=torch.float64).view(1, 1, 5, 2)
    expected = torch.tensor([[[[3.0, 4.0], [8.0, 9.0]]]])  # rows 0-3, then row 4 alone
    torch.testing.assert_close(_block_means(x, 4), expected.double())


# --- ties: the lower key block first --------------------------------------------------------------


def _tied_inputs(seed, num_queries=32, num_keys=96):
    """Integer entries, blocks of 16 rows: means and block scores are exact in every dtype; key
    blocks 3-5 repeat blocks 0-2 exactly, so every block score is tied with another one."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, 2, num_queries, 16), generator=generator).float().to(DEVICE)
    k = torch.randint(-2, 3, (1, 2, num_keys, 16), generator=generator).float().to(DEVICE)
    k[:, :, 48:96] = k[:, :, 0:48]
    v = torch.randn(1, 2, num_keys, 16, generator=generator).to(DEVICE)
    return q, k, v


def test_reference_tie_rule_takes_lower_block():
    q, k, _ = _tied_inputs(seed=70)
    mask = block_selection_mask(q.double(), k.double(), 2, 16, 0.25)
    scores = (_block_means(q.double(), 16) @ _block_means(k.double(), 16).transpose(-2, -1)) * 0.25
    for row_scores, row_mask in zip(scores.reshape(-1, 6), mask.reshape(-1, 6), strict=True):
        order = sorted(range(6), key=lambda j: (-row_scores[j].item(), j))
        assert row_mask.nonzero().flatten().tolist() == sorted(order[:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_follow_the_rule(backend):
    q, k, v = _tied_inputs(seed=71)
    _check_forward_backward(q, k, v, 2, 16, backend, scale=0.25)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_triton_selected_blocks_equal_the_definition():
    from fastvision.triton_kernels.block_topk_attention import select_blocks

    q, k, _ = _tied_inputs(seed=72)
    indices = select_blocks(q, k, 3, 16, 0.25)
    got = torch.zeros(*indices.shape[:3], 6, dtype=torch.bool).scatter_(-1, indices.long(), True)
    assert torch.equal(got, block_selection_mask(q.double(), k.double(), 3, 16, 0.25))


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_block_map_lists_query_blocks_in_order():
    from fastvision.triton_kernels.block_topk_attention import block_map

    indices = torch.tensor([[[[2, 0], [0, 1], [1, 2]]], [[[0, 1], [2, 1], [1, 0]]]], dtype=torch.int32)
    offsets, query_blocks = block_map(indices, 3)
    expected = [[0, 1], [1, 2], [0, 2], [0, 2], [0, 1, 2], [1]]  # per (bh, key block)
    got = [query_blocks[offsets[i] : offsets[i + 1]].tolist() for i in range(6)]
    assert got == expected and offsets[-1] == 12


# --- determinism, poisoned outputs, empty inputs ---------------------------------------------------


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("topk_blocks", [2, 9], ids=["sparse", "dense"])
def test_backward_is_bitwise_deterministic(backend, topk_blocks, causal):
    q, k, v = _inputs(1, 2, 70, 45, 16, torch.float32, seed=90)
    grad_out = _random(q.shape, torch.float32, 91)
    runs = []
    for _ in range(2):
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with fastvision.use_backend(backend):
            out = block_topk_attention(*inputs, topk_blocks, 16, causal=causal)
            runs.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_poisoned_outputs_are_overwritten(backend, monkeypatch):
    """Every output element must be written: buffers start as NaN (float) or -1 (int)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    q, k, v = _inputs(1, 2, 23, 70, 16, torch.float32, seed=80)
    _check_forward_backward(q, k, v, 2, 16, backend)  # key block 4 is selected by no query block
    _check_forward_backward(q, k, v, 2, 16, backend, causal=True)  # key blocks 2-4: no query block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch", "num_queries"), [(0, 5), (2, 0)], ids=["B=0", "Nq=0"])
def test_empty(backend, batch, num_queries):
    q = torch.randn(batch, 2, num_queries, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(batch, 2, 20, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(batch, 2, 20, 16, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out = block_topk_attention(q, k, v, 1, 16)
        out.sum().backward()
    assert out.shape == q.shape
    assert (k.grad == 0).all() and (v.grad == 0).all()


# --- errors ----------------------------------------------------------------------------------------


def _valid():
    return _inputs(1, 2, 4, 6, 16, torch.float32, seed=95)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        pytest.param(lambda q, k, v: (q, k[:, :, :5], v), ValueError, "must have the same shape", id="kv"),
        pytest.param(lambda q, k, v: (q[:1, :1], k, v), ValueError, "must agree in B, H and D", id="heads"),
        pytest.param(lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D", id="3d"),
        pytest.param(lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "one key", id="Nk=0"),
        pytest.param(lambda q, k, v: (q.long(), k, v), TypeError, "q must have dtype", id="int"),
        pytest.param(lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype", id="mixed-dtype"),
        pytest.param(lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor", id="list"),
    ],
)  # fmt: skip
def test_rejects_bad_tensors(make, error, match):
    with pytest.raises(error, match=match):
        block_topk_attention(*make(*_valid()), 1, 16)


@pytest.mark.parametrize(
    ("topk_blocks", "block_size", "error", "match"),
    [
        (0, 16, ValueError, "topk_blocks must be >= 1"),
        (-1, 16, ValueError, "topk_blocks must be >= 1"),
        (1.0, 16, TypeError, "topk_blocks must be an int"),
        (True, 16, TypeError, "topk_blocks must be an int"),
        (1, 48, ValueError, r"block_size must be one of \(16, 32, 64, 128\)"),
        (1, 8, ValueError, "block_size must be one of"),
        (1, 0, ValueError, "block_size must be >= 1"),
        (1, 16.0, TypeError, "block_size must be an int"),
    ],
)
def test_rejects_bad_arguments(topk_blocks, block_size, error, match):
    with pytest.raises(error, match=match):
        block_topk_attention(*_valid(), topk_blocks, block_size)


@pytest.mark.parametrize("causal", [1, None, "yes"])
def test_rejects_non_bool_causal(causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        block_topk_attention(*_valid(), 1, 16, causal=causal)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite float"):
        block_topk_attention(*_valid(), 1, 16, scale=scale)


def test_triton_head_dim_limit_is_declared():
    q, k, v = _inputs(1, 1, 8, 8, 24, torch.float32, seed=96)
    expected = block_topk_attention_reference(q, k, v, 1, 16)
    torch.testing.assert_close(block_topk_attention(q, k, v, 1, 16), expected)  # automatic: reference
    with (
        fastvision.use_backend("triton"),
        pytest.raises(fastvision.BackendUnavailableError, match="head dims"),
    ):
        block_topk_attention(q, k, v, 1, 16)


# --- the module ------------------------------------------------------------------------------------


def test_module_passes_causal_through():
    from fastvision.nn.moe import TopKSparseAttention

    torch.manual_seed(0)
    layer = TopKSparseAttention(32, 2, 2, mode="block", block_size=16, causal=True)
    x = torch.randn(2, 40, 32)
    q, k, v = (layer._split_heads(t) for t in layer.qkv(x).chunk(3, dim=-1))
    attended = block_topk_attention_reference(q, k, v, 2, 16, causal=True)
    expected = layer.out_proj(attended.transpose(1, 2).reshape(2, 40, 32))
    with fastvision.use_backend("reference"):
        torch.testing.assert_close(layer(x), expected)
    assert "causal=True" in repr(layer)
    with pytest.raises(ValueError, match="causal=True needs mode='block'"):
        TopKSparseAttention(32, 2, 2, causal=True)


def test_causal_cost_counts_the_eligible_blocks():
    """Query blocks 0, 1, 2 (16, 16, 8 rows) score min(2, I + 1) whole blocks of 16 keys: 1024 pairs."""
    q, k, v = _inputs(1, 2, 40, 50, 16, torch.float32, seed=97)
    cost = OPS["block_topk_attention"].cost_of(q, k, v, 2, 16, causal=True)
    assert cost.flops == 4 * 2 * (16 * 16 + 16 * 32 + 8 * 32) * 16
    assert cost.bytes_moved == OPS["block_topk_attention"].cost_of(q, k, v, 2, 16).bytes_moved
