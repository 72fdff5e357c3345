"""topk_attention: every backend against the float64 reference, forward and backward; ties; errors;
registration (opcheck, compile, export)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision._backend import why_unusable
from fastvision.ops import OPS
from fastvision.ops.topk_attention import (
    _selection_mask,
    topk_attention,
    topk_attention_reference,
)

BACKENDS = backend_params(OPS["topk_attention"].backends)
TRITON = [p for p in BACKENDS if p.id == "triton"]
TRITON_USABLE = why_unusable("triton", DEVICE) is None

# (dtype, head_dim, num_queries, num_keys, topk): odd lengths so no dimension fills whole blocks.
CASES = [
    pytest.param(torch.float32, 16, 37, 50, 1, id="f32-d16-top1"),
    pytest.param(torch.float32, 32, 37, 50, 5, id="f32-d32-top5"),
    pytest.param(torch.float32, 64, 37, 50, 49, id="f32-d64-top(Nk-1)"),
    pytest.param(torch.float32, 16, 37, 50, 50, id="f32-d16-top(Nk)"),
    pytest.param(torch.float32, 16, 21, 50, 80, id="f32-d16-top(>Nk)"),
    pytest.param(torch.float32, 128, 9, 41, 7, id="f32-d128-top7"),
    pytest.param(torch.float16, 32, 37, 50, 5, id="f16-d32-top5"),
    pytest.param(torch.bfloat16, 64, 37, 50, 5, id="bf16-d64-top5"),
    pytest.param(torch.bfloat16, 16, 19, 50, 50, id="bf16-d16-dense"),
    pytest.param(torch.float32, 16, 5, 300, 280, id="f32-top280-chunked-selection"),
]


def _random(shape, dtype, seed, device=DEVICE):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _inputs(batch, heads, num_queries, num_keys, head_dim, dtype, seed):
    q = _random((batch, heads, num_queries, head_dim), dtype, seed)
    k = _random((batch, heads, num_keys, head_dim), dtype, seed + 1)
    v = _random((batch, heads, num_keys, head_dim), dtype, seed + 2)
    return q, k, v


def _check_forward_backward(q, k, v, topk, backend, scale=None, seed=0, grad_scale=4.0):
    dtype = q.dtype
    inputs_before = [t.clone() for t in (q, k, v)]
    grad_out = _random(q.shape, dtype, seed + 3, q.device)
    reference_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = topk_attention_reference(*reference_inputs, topk, scale)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.double())

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with fastvision.use_backend(backend):
        out = topk_attention(*inputs, topk, scale)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, scale=2.0)
    for name, grad, expected_grad, tensor in zip("qkv", grads, expected_grads, inputs, strict=True):
        assert grad.dtype == dtype and grad.shape == tensor.shape, name
        assert_close(grad, expected_grad, dtype, scale=grad_scale)
    for before, after in zip(inputs_before, (q, k, v), strict=True):
        torch.testing.assert_close(after.detach(), before, atol=0, rtol=0)  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "head_dim", "num_queries", "num_keys", "topk"), CASES)
def test_matches_reference(backend, dtype, head_dim, num_queries, num_keys, topk):
    q, k, v = _inputs(1, 2, num_queries, num_keys, head_dim, dtype, seed=num_keys + topk + head_dim)
    _check_forward_backward(q, k, v, topk, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_batch(backend):
    q, k, v = _inputs(2, 3, 11, 23, 16, torch.float32, seed=40)
    _check_forward_backward(q, k, v, 4, backend, scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    # [B, N, H, D] storage viewed as [B, H, N, D] (the usual projection layout), D-strided keys.
    q = _random((1, 13, 2, 16), torch.float32, seed=50).transpose(1, 2)
    k = _random((1, 29, 2, 32), torch.float32, seed=51).transpose(1, 2)[..., ::2]
    v = _random((1, 2, 29, 48), torch.float32, seed=52)[..., 8:24]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_forward_backward(q, k, v, 6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch", "num_queries"), [(0, 5), (2, 0)], ids=["B=0", "Nq=0"])
def test_empty(backend, batch, num_queries):
    q = torch.randn(batch, 2, num_queries, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(batch, 2, 7, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(batch, 2, 7, 16, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out = topk_attention(q, k, v, 3)
        out.sum().backward()
    assert out.shape == q.shape
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert (k.grad == 0).all() and (v.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [30, 1000])
def test_dense_topk_equals_sdpa(backend, topk):
    q, k, v = _inputs(1, 2, 17, 30, 32, torch.float32, seed=60)
    with fastvision.use_backend(backend):
        out = topk_attention(q, k, v, topk)
        out_scaled = topk_attention(q, k, v, topk, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    expected_scaled = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out_scaled, expected_scaled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_scores_past_float16_range(backend):
    """Scores above 65504 are fine: the math is float32 whatever the storage dtype."""
    q, k, v = _inputs(1, 1, 6, 9, 16, torch.float32, seed=62)
    q, k = q * 90, k * 90  # q.k reaches ~1e5 (overflows float16), while q and k fit it
    half = [t.half() for t in (q, k, v)]
    with fastvision.use_backend(backend):
        out = topk_attention(*half, 3, scale=1.0)
    expected = topk_attention_reference(*(t.double() for t in half), 3, scale=1.0)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float16, scale=2.0)


def test_sparse_differs_from_dense():
    q, k, v = _inputs(1, 1, 8, 40, 16, torch.float64, seed=61)
    assert (topk_attention_reference(q, k, v, 5) - topk_attention_reference(q, k, v, 40)).abs().max() > 1e-3


# --- ties: lower key index wins -------------------------------------------------------------------


def _tied_inputs(seed):
    """Entries in {-1, 0, 1}: scores are small integers, exact in every dtype, with many ties."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (1, 2, 19, 16), generator=generator).float().to(DEVICE)
    k = torch.randint(-1, 2, (1, 2, 45, 16), generator=generator).float().to(DEVICE)
    k[:, :, 30:] = k[:, :, :15]  # exact duplicate keys: ties between an early and a late index
    v = torch.randn(1, 2, 45, 16, generator=generator).to(DEVICE)
    return q, k, v


def test_reference_tie_rule_takes_lower_index():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    expected = torch.tensor([[False, True, True, True, True, False, False]])
    assert torch.equal(_selection_mask(scores, 4), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_follow_the_rule(backend):
    q, k, v = _tied_inputs(seed=70)
    _check_forward_backward(q, k, v, 6, backend)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("native_sort", [False, True], ids=["network-sort", "tl.sort"])
def test_triton_selection_indices(native_sort):
    """Selected indices equal the reference's selection (as sets), ties included, for both sorts."""
    from fastvision.triton_kernels.topk_attention import select_topk

    q, k, _ = _tied_inputs(seed=71)
    q, k = q[:, :1, :9], k[:, :1]  # tl.sort is slow under the interpreter: keep it tiny
    topk = 7
    indices = select_topk(q, k, topk, 0.25, native_sort=native_sort)
    mask = _selection_mask((q.double() @ k.double().transpose(-2, -1)) * 0.25, topk)
    got = torch.zeros_like(mask).scatter_(-1, indices.long(), True)
    assert torch.equal(got, mask)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_poisoned_outputs_are_overwritten(backend, monkeypatch):
    """Every output element must be written: buffers start as NaN (float) or -1 (int)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    q, k, v = _inputs(1, 2, 23, 35, 16, torch.float32, seed=80)
    _check_forward_backward(q, k, v, 3, backend)


# --- errors --------------------------------------------------------------------------------------


def _valid(dtype=torch.float32):
    return _inputs(1, 2, 4, 6, 16, dtype, seed=90)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        pytest.param(
            lambda q, k, v: (q, k[:, :, :5], v), ValueError, "k and v must have the same shape", id="kv"
        ),
        pytest.param(lambda q, k, v: (q[:1, :1], k, v), ValueError, "must agree in B, H and D", id="heads"),
        pytest.param(
            lambda q, k, v: (q, torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)),
            ValueError,
            "must agree in B, H and D",
            id="head-dim",
        ),
        pytest.param(lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D", id="3d"),
        pytest.param(
            lambda q, k, v: (torch.randn(1, 2, 4, 24), torch.randn(1, 2, 6, 24), torch.randn(1, 2, 6, 24)),
            ValueError,
            "head dim D",
            id="unsupported-D",
        ),
        pytest.param(
            lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "at least one key", id="Nk=0"
        ),
        pytest.param(lambda q, k, v: (q.long(), k, v), TypeError, "q must have dtype", id="int"),
        pytest.param(lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype", id="mixed-dtype"),
        pytest.param(lambda q, k, v: (q, k.double(), v), TypeError, "k must have dtype", id="float64"),
        pytest.param(lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor", id="list"),
    ],
)
def test_rejects_bad_tensors(make, error, match):
    with pytest.raises(error, match=match):
        topk_attention(*make(*_valid()), 3)


@pytest.mark.parametrize(
    ("topk", "error", "match"),
    [(0, ValueError, "topk must be >= 1"), (-2, ValueError, "topk must be >= 1"),
     (2.0, TypeError, "topk must be an int"), (True, TypeError, "topk must be an int")],
)  # fmt: skip
def test_rejects_bad_topk(topk, error, match):
    with pytest.raises(error, match=match):
        topk_attention(*_valid(), topk)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite float"):
        topk_attention(*_valid(), 3, scale=scale)


def test_forced_backend_that_cannot_run_raises():
    with fastvision.use_backend("cuda"), pytest.raises(fastvision.BackendUnavailableError, match="cuda"):
        topk_attention(*_valid(), 3)


# --- registration: opcheck, compile, export --------------------------------------------------------


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("topk", [3, 20], ids=["sparse", "dense"])
def test_opcheck(topk):
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 5, 9, 16, torch.float32, seed=100))
    torch.library.opcheck(torch.ops.fastvision.topk_attention_triton_forward.default, (q, k, v, topk, 0.25))


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_opcheck_backward():
    from fastvision.triton_kernels.topk_attention import topk_attention_forward

    q, k, v = _inputs(1, 2, 5, 9, 16, torch.float32, seed=101)
    out, lse, indices = topk_attention_forward(q, k, v, 3, 0.25)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastvision.topk_attention_triton_backward.default,
        (grad_out, q, k, v, out, lse, indices, 0.25),
    )


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("topk", [5, 50], ids=["sparse", "dense"])
def test_backward_is_bitwise_deterministic(backend, topk):
    """No atomics: two runs of the backward give the same bits (tied keys included)."""
    q, k, v = _tied_inputs(seed=102)
    grad_out = _random(q.shape, torch.float32, 103)
    runs = []
    for _ in range(2):
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with fastvision.use_backend(backend):
            out = topk_attention(*inputs, topk)
            runs.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_selection_map_lists_queries_in_order():
    from fastvision.triton_kernels.topk_attention import selection_map

    indices = torch.tensor([[[[3, 0], [0, 1], [1, 3]]], [[[0, 2], [2, 1], [1, 0]]]], dtype=torch.int32)
    offsets, rows = selection_map(indices, 4)
    expected = [[0, 1], [1, 2], [], [0, 2], [0, 2], [1, 2], [0, 1], []]  # per (bh, key)
    assert [rows[offsets[i] : offsets[i + 1]].tolist() for i in range(8)] == expected


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize(
    ("batch", "heads", "num_rows", "num_selected", "num_keys"),
    [(2, 3, 37, 5, 50), (1, 1, 9, 41, 41), (1, 2, 1, 1, 7), (2, 1, 0, 3, 5)],
)
def test_selection_map_random_selections(batch, heads, num_rows, num_selected, num_keys):
    """int32 offsets and rows; each key's queries in increasing order, every (batch, head) apart."""
    from fastvision.triton_kernels.topk_attention import selection_map

    generator = torch.Generator().manual_seed(num_rows + num_keys)
    count = batch * heads * num_rows
    rows_of = [torch.randperm(num_keys, generator=generator)[:num_selected] for _ in range(count)]
    shape = (batch, heads, num_rows, num_selected)
    indices = (torch.stack(rows_of) if rows_of else torch.zeros(0, num_selected)).to(torch.int32).view(shape)
    offsets, rows = selection_map(indices.to(DEVICE), num_keys)
    assert offsets.dtype == rows.dtype == torch.int32
    assert offsets.shape == (batch * heads * num_keys + 1,) and rows.shape == (indices.numel(),)
    flat = indices.view(batch * heads, num_rows, num_selected)
    for bh in range(batch * heads):
        for key in range(num_keys):
            expected = [m for m in range(num_rows) if key in flat[bh, m].tolist()]
            entry = bh * num_keys + key
            assert rows[offsets[entry] : offsets[entry + 1]].tolist() == expected


class _TopkAttentionBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=2, topk=4):
        super().__init__()
        self.heads, self.topk = heads, topk
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return topk_attention(q, k, v, self.topk).transpose(1, 2).reshape(batch, tokens, dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch.manual_seed(0)
    module = _TopkAttentionBlock().to(DEVICE)
    x = _random((2, 9, 32), torch.float32, seed=110).requires_grad_(True)
    with fastvision.use_backend(backend):
        expected = module(x)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_export(backend):
    torch.manual_seed(0)
    module = _TopkAttentionBlock().eval().to(DEVICE)
    x = _random((2, 9, 32), torch.float32, seed=111)
    with fastvision.use_backend(backend):
        exported = torch.export.export(module, (x,))
        expected = module(x)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    if backend != "reference":
        assert any("topk_attention" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [2**31, 2**63, 2**70])
def test_huge_topk_is_dense_attention(backend, topk):
    q, k, v = _inputs(1, 2, 5, 7, 16, torch.float32, seed=63)
    with fastvision.use_backend(backend):
        out = topk_attention(q, k, v, topk)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


# --- the selection's threshold, candidate buffer and merges (Triton) ------------------------------


def _check_selection(q, k, topk, scale=0.25, segment=None, score_dtype=torch.float64):
    """The Triton selection equals the definition on ``score_dtype`` scores (as sets, ties included)."""
    from fastvision.triton_kernels.topk_attention import select_topk

    indices = select_topk(q, k, topk, scale, segment=segment)
    assert indices.dtype == torch.int32 and indices.shape == (*q.shape[:3], topk)
    scores = q.to(score_dtype) @ k.to(score_dtype).transpose(-2, -1)
    mask = _selection_mask(scores * scale, topk)
    got = torch.zeros_like(mask).scatter_(-1, indices.long(), True)
    assert torch.equal(got, mask)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an index selected twice"


def _small_integers(shape, seed, low=-2, high=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator).to(device=DEVICE, dtype=dtype)


# segment=1: the buffers are checked (and merged when a row holds more than the best-keys width)
# after every key block; segment=8: 8 blocks append before each check, so the buffers take many
# candidates between merges; None: the launcher's tile.
SEGMENTS = [
    pytest.param(1, id="check-every-block"),
    pytest.param(8, id="long-segments"),
    pytest.param(None, id="tile"),
]


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("topk", [1, 5, 33])
def test_selection_keys_in_increasing_score_order(topk, segment):
    """Scores rise with the key index: every block improves every query, so every block brings
    candidates (the buffer fills and is merged again and again); the last keys are the answer."""
    num_keys = 150  # not a multiple of the 32- or 64-key blocks
    q = _small_integers((1, 2, 7, 16), seed=100, low=1, high=4)
    k = torch.zeros((1, 2, num_keys, 16), device=DEVICE)
    k[..., 0] = torch.arange(num_keys, device=DEVICE) / 8  # exact scores q0 * j / 8 * 0.25
    _check_selection(q, k, topk, segment=segment)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize(("num_queries", "num_keys", "topk"), [(9, 700, 6), (1, 333, 100), (20, 257, 64)])
def test_selection_random_scores(num_queries, num_keys, topk, segment):
    """Continuous scores in random key order: a few candidates per block after the first ones."""
    q = _random((1, 2, num_queries, 16), torch.float32, seed=num_keys)
    k = _random((1, 2, num_keys, 16), torch.float32, seed=num_keys + 1)
    _check_selection(q, k, topk, segment=segment)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("topk", [1, 7, 40])
def test_selection_ties_at_the_threshold(topk, segment):
    """Scores from {-1, 0, 1} entries: hundreds of keys share the k-th score; the lower index wins."""
    q = _small_integers((1, 2, 11, 16), seed=101, low=-1, high=2)
    k = _small_integers((1, 2, 301, 16), seed=102, low=-1, high=2)
    k[:, :, 200:] = k[:, :, :101]  # exact duplicates of early keys, later
    _check_selection(q, k, topk, segment=segment)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("segment", SEGMENTS)
def test_selection_signed_zero_scores(segment):
    """-0.0 and +0.0 are one score: zero keys (and zero queries) tie, taken by the lower index."""
    q = _small_integers((1, 1, 6, 16), seed=103, low=-1, high=2)
    q[:, :, 0] = -0.0  # a query whose every score is a zero
    k = _small_integers((1, 1, 90, 16), seed=104, low=-1, high=2)
    k[:, :, ::3] = -0.0  # a third of the keys score exactly zero
    k[:, :, 1::3] = 0.0
    _check_selection(q, k, 20, scale=1.0, segment=segment)
    _check_selection(q, k, 20, scale=1.0, segment=segment)  # the same answer again


def _infinite_scores(num_keys: int, finite: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k whose float32 scores are -inf except at keys ``finite`` (q[0] * k[0] overflows)."""
    q = _small_integers((1, 2, 5, 16), seed=107, low=1, high=3)
    q[..., 0] = -3e38
    k = _small_integers((1, 2, num_keys, 16), seed=108, low=-2, high=3)
    k[..., 0] = 10.0
    k[:, :, finite, 0] = 0.0
    return q, k


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("finite", [[], [10, 20], list(range(0, 97, 3))], ids=["none", "two", "many"])
def test_selection_minus_infinite_scores(finite, segment):
    """Scores of -inf still fill a row that has fewer than topk finite scores, lowest index first
    (float32 overflow gives them; the definition is taken on float32 scores too)."""
    q, k = _infinite_scores(97, finite)
    for topk in (1, 4, 40):
        _check_selection(q, k, topk, segment=segment, score_dtype=torch.float32)


@pytest.mark.parametrize("backend", TRITON)
def test_minus_infinite_scores_forward_backward(backend):
    """Rows with two finite scores among -inf ones and topk = 4: two -inf keys are selected too, with
    zero weight; output and gradients equal the float64 reference (where those scores are finite but
    so low that their weight is zero as well)."""
    q, k = _infinite_scores(70, [3, 50])
    v = _random((1, 2, 70, 16), torch.float32, seed=109)
    leaf = q.clone().requires_grad_(True)
    with fastvision.use_backend(backend):
        out = topk_attention(leaf, k, v, 4)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    q64 = q.double().requires_grad_(True)
    reference = topk_attention_reference(q64, k.double(), v.double(), 4)
    (grad64,) = torch.autograd.grad(reference.sum(), q64)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_selection_nan_scores_keep_indices_in_range():
    """NaN scores give NaN-dependent output, but never an index outside the keys."""
    from fastvision.triton_kernels.topk_attention import select_topk

    q = _small_integers((1, 1, 4, 16), seed=110)
    k = _small_integers((1, 1, 90, 16), seed=111)
    q[0, 0, 0] = float("nan")  # every score of query 0 is NaN
    k[0, 0, 5:60, 0] = float("nan")  # most keys NaN for every query
    indices = select_topk(q, k, 8, 0.25)
    assert ((indices >= 0) & (indices < 90)).all()
    with pytest.raises(ValueError, match="segment must be a positive int"):
        select_topk(q, k, 8, 0.25, segment=0)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("topk", [3, 17])
def test_selection_half_inputs(dtype, topk):
    """16-bit inputs (exact small integers): float32 scores, the same selection as float64."""
    q = _small_integers((2, 1, 13, 32), seed=105, dtype=dtype)
    k = _small_integers((2, 1, 201, 32), seed=106, dtype=dtype)
    _check_selection(q, k, topk)


@pytest.mark.parametrize("backend", TRITON)
def test_many_candidates_forward_backward(backend):
    """The op (forward and backward) on keys in increasing score order, against float64."""
    q = _small_integers((1, 2, 5, 16), seed=107, low=1, high=4)
    k = torch.zeros((1, 2, 97, 16), device=DEVICE)
    k[..., 0] = torch.arange(97, device=DEVICE) / 32
    k[..., 1:] = _random((1, 2, 97, 15), torch.float32, seed=108) / 64
    v = _random((1, 2, 97, 16), torch.float32, seed=109)
    _check_forward_backward(q, k, v, 9, backend)


@pytest.mark.skipif(not TRITON_USABLE, reason="triton cannot run on this device")
def test_selection_in_several_launches(monkeypatch):
    """A candidate scratch too small for every (batch, head) at once: launches of a few (batch, head)
    pairs each give the same selection as one launch."""
    from fastvision.triton_kernels import topk_attention as kernels

    q = _random((2, 3, 21, 16), torch.float32, seed=120)
    k = _random((2, 3, 150, 16), torch.float32, seed=121)
    whole = kernels.select_topk(q, k, 9, 0.25)
    monkeypatch.setattr(kernels, "_SCRATCH_ENTRIES", 1)  # one (batch, head) per launch
    assert torch.equal(kernels.select_topk(q, k, 9, 0.25), whole)
    _check_selection(q, k, 9)
