"""Top-k sparse attention: each query attends only to the ``topk`` keys with the highest scores.

``out[b, h, i] = sum_{j in S_i} softmax_j(s_ij) v[b, h, j]`` with ``s_ij = scale * q_i . k_j`` and
``S_i`` the ``topk`` keys of largest score for query ``i``. ``topk >= Nk`` is dense attention.

Ties: keys are ordered by ``(score, -index)``, so among equal scores the lower key index is taken
first. The reference and the Triton kernels both follow this rule, which makes the selection (and
so the output) deterministic. Inputs holding NaN give unspecified results.

Backends: ``reference`` (below: dense scores, a mask, a softmax, in float32; O(Nq * Nk) memory) and
``triton`` (triton_kernels/topk_attention.py: selection, forward and backward fused without an
Nq x Nk score matrix; memory O(B * H * N * (D + topk)); see that module for the design and its
costs). The Triton launches are the ops ``fastvision::topk_attention_triton_forward`` /
``_backward`` below; the op contract (``fastvision/ops/_contract.py``) registers their fake kernels
and autograd. ``topk >= Nk`` selects every key: kernel backends then run
``scaled_dot_product_attention`` (float32 math on CPU tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision.ops._checks import (
    check_attention_backward,
    check_attention_inputs,
    check_float,
    check_scale,
)
from fastvision.ops._contract import (
    AutogradRule,
    KernelBackend,
    OpCost,
    OpSpec,
    define_op,
    leaf,
    triton_launch,
    without_autocast,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def _selection_mask(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean mask of the ``topk`` largest scores per row, ties going to the lower key index."""
    num_keys = scores.shape[-1]
    if topk >= num_keys:
        return torch.ones_like(scores, dtype=torch.bool)
    # The k-th largest score is the threshold; keys above it are in, keys equal to it are taken in
    # index order until the row holds exactly topk keys.
    threshold = scores.topk(topk, dim=-1).values[..., -1:]
    above = scores > threshold
    at = scores == threshold
    room = topk - above.sum(dim=-1, keepdim=True)
    return above | (at & (at.cumsum(dim=-1) <= room))


_SELECTION_CHUNK = 1 << 24  # elements of the [rows, Nk, D] products summed at a time


def _selection_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q . k`` for the selection, summed over D in one order for every (query, key) pair:
    identical keys get bit-identical scores, so ties go to the lower index as documented (a matmul's
    blocking can round the same dot product differently at different key positions)."""
    batch, heads, num_queries, head_dim = q.shape
    if num_queries == 0:
        return q.new_zeros((batch, heads, 0, k.shape[2]))
    rows = max(1, _SELECTION_CHUNK // max(1, batch * heads * k.shape[2] * head_dim))
    parts = [
        (q[:, :, i : i + rows, None, :] * k[:, :, None, :, :]).sum(-1)
        for i in range(0, num_queries, rows)
    ]
    return torch.cat(parts, dim=2) * scale


@without_autocast
def topk_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float | None = None
) -> torch.Tensor:
    """The definition, in plain PyTorch with float32 math (differentiable; memory O(Nq * Nk) per head)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)
    q32, k32 = q.to(compute), k.to(compute)
    scores = (q32 @ k32.transpose(-2, -1)) * scale
    selected = _selection_mask(_selection_scores(q32.detach(), k32.detach(), scale), topk)
    weights = torch.softmax(scores.masked_fill(~selected, float("-inf")), dim=-1)
    return (weights @ v.to(compute)).to(q.dtype)


def _attend_selected(q, k, v, indices, scale):
    """Attention of each query over its saved key ``indices`` (all keys when there are none)."""
    if indices.shape[-1] == 0:
        weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
        return weights @ v
    batch, heads = q.shape[:2]
    b = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=q.device).view(1, heads, 1, 1)
    rows = indices.long()
    keys, values = k[b, h, rows], v[b, h, rows]  # [B, H, Nq, topk, D]
    weights = torch.softmax((q.unsqueeze(-2) * keys).sum(-1) * scale, dim=-1)
    return (weights.unsqueeze(-1) * values).sum(-2)


def _backward_op_reference(grad_out, q, k, v, out, lse, indices, scale):
    """The backward ops' definition over the saved selection, differentiable (the higher-order rule)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.enable_grad():
        inputs = [leaf(t.to(compute)) for t in (q, k, v)]
        attended = _attend_selected(*inputs, indices, scale)
        grads = torch.autograd.grad(attended, inputs, grad_out.to(compute), create_graph=True)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))


# --- Triton backend, wrapped as custom ops ------------------------------------------------------


@triton_launch("topk_attention_triton_forward")
def topk_attention_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse, indices)``: the log-sum-exp per query and the selected key indices
    (``[B, H, Nq, topk]`` int32; ``[B, H, Nq, 0]`` when ``topk >= Nk``, which needs none)."""
    from fastvision.triton_kernels.topk_attention import topk_attention_forward

    return topk_attention_forward(q, k, v, topk, scale)


@triton_launch("topk_attention_triton_backward")
def topk_attention_triton_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.topk_attention import topk_attention_backward

    return topk_attention_backward(grad_out, q, k, v, out, lse, indices, scale)


def _forward_fake(q, k, v, topk, scale):
    batch, heads, num_queries, _ = q.shape
    num_selected = topk if topk < k.shape[2] else 0
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, heads, num_queries), dtype=torch.float32),
        q.new_empty((batch, heads, num_queries, num_selected), dtype=torch.int32),
    )


def _backward_fake(grad_out, q, k, v, out, lse, indices, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _topk, scale = inputs
    out, lse, indices = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, indices)


def _backward(ctx, backward_op, grad_out, _grad_lse, _grad_indices):
    q, k, v, out, lse, indices = ctx.saved_tensors
    # The backward op is not differentiable in ``out`` (AUTOGRAD.backward_differentiable): passing it
    # detached keeps a higher-order gradient from walking back into this forward node, which torch
    # 2.11 runs with zero gradients after its saved tensors were freed (opcheck's AOT check fails).
    dq, dk, dv = backward_op(grad_out, q, k, v, out.detach(), lse, indices, ctx.scale)
    return dq, dk, dv, None, None




# --- public op ------------------------------------------------------------------------------------


def _check_qkv(q, k, v) -> None:
    check_attention_inputs(q, k, v)
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim D (last dim of q, k, v) must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[3]}"
        )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale) -> None:
    _check_qkv(q, k, v)
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    check_scale(scale)


def _check(q, k, v, topk, scale=None):
    _check_inputs(q, k, v, topk, scale)
    return q, k, v, topk, float(q.shape[-1] ** -0.5 if scale is None else scale)


def _check_forward_op(q, k, v, topk, scale) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them."""
    _check_inputs(q, k, v, topk, scale)
    check_float("scale", scale)


def _check_backward_op(grad_out, q, k, v, out, lse, indices, scale) -> None:
    """The backward op's own arguments: the forward's, its saved outputs, key indices in [0, Nk)."""
    _check_qkv(q, k, v)
    check_float("scale", scale)
    check_attention_backward(grad_out, q, k, v, out, lse, indices, q.shape[2], k.shape[2])


@without_autocast
def _dense(q, k, v, scale):
    """Every key selected: SDPA, in float32 on CPU tensors (the op promises float32 math)."""
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute), scale=scale)
    return out.to(q.dtype)


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_backward_op_reference,
    backward_differentiable=(0, 1, 2, 3),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


def _run_selection(forward_op, q, k, v, topk, scale):
    if topk >= k.shape[2]:
        return _dense(q, k, v, scale)
    return forward_op(q, k, v, topk, scale)[0]


def _cost(q, k, v, topk, scale) -> OpCost:
    """Read q, k, v and write out once; FLOPs of scores and weighted sum over the selected keys,
    ``4 B H Nq min(topk, Nk) D`` (the selection's ``2 B H Nq Nk D`` is extra work, not counted)."""
    batch, heads, num_queries, head_dim = q.shape
    moved = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
    return OpCost(moved, 4 * batch * heads * num_queries * min(topk, k.shape[2]) * head_dim)


TOPK_ATTENTION = define_op(
    OpSpec(
        name="topk_attention",
        cost=_cost,
        reference=topk_attention_reference,
        check=_check,
        device=lambda q, *_: q.device,
        kernels={
            "triton": KernelBackend(
                "topk_attention_triton_forward", "topk_attention_triton_backward", AUTOGRAD,
                call=_run_selection,
            ),
        },
        gpu_order=("triton",),
        cpu_order=(),
        triton_module="fastvision.triton_kernels.topk_attention",
        benchmark_module="fastvision.benchmark.topk_attention",
    )
)


def topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float | None = None
) -> torch.Tensor:
    """Attention in which each query sees only its ``topk`` highest-scoring keys.

    Args:
        q: ``[B, H, Nq, D]`` queries; float32, float16 or bfloat16, any strides. ``D`` in
            (16, 32, 64, 128).
        k: ``[B, H, Nk, D]`` keys, same dtype and device as ``q``; ``Nk >= 1``.
        v: ``[B, H, Nk, D]`` values.
        topk: keys per query, ``>= 1``; ``topk >= Nk`` gives dense attention (SDPA).
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, Nq, D]`` tensor of ``q``'s dtype. Among equal scores the lower key index is
        selected first. Math in float32.
    """
    return TOPK_ATTENTION(q, k, v, topk, scale)
