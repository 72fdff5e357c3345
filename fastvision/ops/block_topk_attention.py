"""Block top-k sparse attention: each block of queries attends to its ``topk_blocks`` best key blocks.

Rows of ``q`` ``[B, H, Nq, D]`` and of ``k``, ``v`` ``[B, H, Nk, D]`` are cut into consecutive blocks
of ``block_size`` rows (16, 32, 64 or 128); a last partial block holds the remaining rows. The block
score of query block ``I`` and key block ``J`` is ``s(I, J) = scale * mean(q[I]) . mean(k[J])``
(means over the rows that exist). Query block ``I`` selects the ``topk_blocks`` key blocks of
largest ``s(I, J)`` (ties: the lower ``J`` first), and each of its queries attends with one softmax
over every key of those blocks:

``out[i] = softmax_{j in S(I(i))}(scale * q_i . k_j) @ v`` with ``S(I)`` the keys of the selected blocks.

``topk_blocks >= ceil(Nk / block_size)`` is dense attention. Gradients flow through the attention;
the selection is not differentiated. Inputs holding NaN give unspecified results.

Backends: ``reference`` (below: block means, block scores and a dense masked softmax in float32;
O(Nq * Nk) memory) and ``triton`` (triton_kernels/block_topk_attention.py: block means, selection,
and flash attention over the selected key blocks only, cost O(Nq * topk_blocks * block_size * D);
a backward without atomics, bit-identical from run to run).
"""

from __future__ import annotations

import torch

from fastvision.ops._checks import check_attention_inputs, check_scale
from fastvision.ops._contract import (
    AutogradRule,
    KernelBackend,
    OpCost,
    OpSpec,
    define_op,
    leaf,
    triton_launch,
)
from fastvision.ops.topk_attention import _selection_mask

BLOCK_SIZES = (16, 32, 64, 128)
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., ceil(N / block_size), D]`` means of consecutive row blocks (the last over its rows)."""
    num_rows = x.shape[-2]
    num_blocks = -(-num_rows // block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, num_blocks * block_size - num_rows))
    sums = padded.unflatten(-2, (num_blocks, block_size)).sum(-2)
    counts = torch.full((num_blocks,), block_size, dtype=x.dtype, device=x.device)
    if num_blocks:
        counts[-1] = num_rows - (num_blocks - 1) * block_size
    return sums / counts[:, None]


def _expand_blocks(
    block_mask: torch.Tensor, block_size: int, num_queries: int, num_keys: int
) -> torch.Tensor:
    """Block mask ``[..., Nqb, Nkb]`` -> token mask ``[..., Nq, Nk]``."""
    rows = torch.arange(num_queries, device=block_mask.device) // block_size
    cols = torch.arange(num_keys, device=block_mask.device) // block_size
    return block_mask[..., rows, :][..., cols]


def block_selection_mask(q: torch.Tensor, k: torch.Tensor, topk_blocks: int, block_size: int, scale: float):
    """``[B, H, Nqb, Nkb]`` boolean: the key blocks each query block selects (the definition)."""
    with torch.no_grad():
        block_scores = (_block_means(q, block_size) @ _block_means(k, block_size).transpose(-2, -1)) * scale
        return _selection_mask(block_scores, topk_blocks)


def _masked_attention(q, k, v, token_mask, scale):
    scores = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(scores.masked_fill(~token_mask, float("-inf")), dim=-1) @ v


def block_topk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_blocks: int,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition, in plain PyTorch with float32 math (differentiable; memory O(Nq * Nk) per head)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    selected = block_selection_mask(qc.detach(), kc.detach(), topk_blocks, block_size, scale)
    token_mask = _expand_blocks(selected, block_size, q.shape[-2], k.shape[-2])
    return _masked_attention(qc, kc, vc, token_mask, scale).to(q.dtype)


def _backward_op_reference(grad_out, q, k, v, out, lse, indices, block_size, scale):
    """The backward op's definition over the saved selection, differentiable (the higher-order rule)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    num_query_blocks = indices.shape[2]
    num_key_blocks = -(-k.shape[2] // block_size)
    if indices.shape[-1] == 0:
        block_mask = torch.ones(num_query_blocks, num_key_blocks, dtype=torch.bool, device=q.device)
    else:
        block_mask = torch.zeros((*indices.shape[:3], num_key_blocks), dtype=torch.bool, device=q.device)
        block_mask.scatter_(-1, indices.long(), True)
    token_mask = _expand_blocks(block_mask, block_size, q.shape[2], k.shape[2])
    with torch.enable_grad():
        inputs = [leaf(t.to(compute)) for t in (q, k, v)]
        attended = _masked_attention(*inputs, token_mask, scale)
        grads = torch.autograd.grad(
            attended, inputs, grad_out.to(compute), create_graph=True, allow_unused=True
        )
    return tuple(
        torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)
    )


# --- Triton backend, wrapped as custom ops ------------------------------------------------------


@triton_launch("block_topk_attention_triton_forward")
def block_topk_attention_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_blocks: int, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse, indices)``: the log-sum-exp per query and the selected key blocks per query
    block (``[B, H, Nqb, topk_blocks]`` int32; ``[B, H, Nqb, 0]`` when every block is selected)."""
    from fastvision.triton_kernels.block_topk_attention import block_topk_attention_forward

    return block_topk_attention_forward(q, k, v, topk_blocks, block_size, scale)


@triton_launch("block_topk_attention_triton_backward")
def block_topk_attention_triton_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.block_topk_attention import block_topk_attention_backward

    return block_topk_attention_backward(grad_out, q, k, v, out, lse, indices, block_size, scale)


def _forward_fake(q, k, v, topk_blocks, block_size, scale):
    batch, heads, num_queries, _ = q.shape
    num_query_blocks = (num_queries + block_size - 1) // block_size
    num_key_blocks = (k.shape[2] + block_size - 1) // block_size
    num_selected = topk_blocks if topk_blocks < num_key_blocks else 0
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, heads, num_queries), dtype=torch.float32),
        q.new_empty((batch, heads, num_query_blocks, num_selected), dtype=torch.int32),
    )


def _backward_fake(grad_out, q, k, v, out, lse, indices, block_size, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _topk_blocks, block_size, scale = inputs
    out, lse, indices = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.block_size, ctx.scale = block_size, scale
    ctx.mark_non_differentiable(lse, indices)


def _backward(ctx, backward_op, grad_out, _grad_lse, _grad_indices):
    q, k, v, out, lse, indices = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, indices, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_backward_op_reference,
    backward_differentiable=(0, 1, 2, 3),
)


# --- public op ------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check(q, k, v, topk_blocks, block_size=64, scale=None):
    check_attention_inputs(q, k, v)
    if q.shape[3] == 0:
        raise ValueError("head dim D (last dim of q, k, v) must be >= 1")
    _check_int("topk_blocks", topk_blocks, 1)
    _check_int("block_size", block_size, 1)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    check_scale(scale)
    return q, k, v, topk_blocks, block_size, float(q.shape[-1] ** -0.5 if scale is None else scale)


def _triton_supports(q, k, v, topk_blocks, block_size, scale):
    if q.shape[3] not in TRITON_HEAD_DIMS:
        return f"the triton backend takes head dims {TRITON_HEAD_DIMS}, got D = {q.shape[3]}"
    return None


def _run(forward_op, q, k, v, topk_blocks, block_size, scale):
    return forward_op(q, k, v, topk_blocks, block_size, scale)[0]


def _cost(q, k, v, topk_blocks, block_size, scale) -> OpCost:
    """Read q, k, v and write out once; FLOPs of scores and weighted sum over the selected keys,
    ``4 B H Nq min(topk_blocks block_size, Nk) D`` (block selection not counted)."""
    batch, heads, num_queries, head_dim = q.shape
    moved = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
    selected = min(topk_blocks * block_size, k.shape[2])
    return OpCost(moved, 4 * batch * heads * num_queries * selected * head_dim)


BLOCK_TOPK_ATTENTION = define_op(
    OpSpec(
        name="block_topk_attention",
        cost=_cost,
        reference=block_topk_attention_reference,
        check=_check,
        device=lambda q, *_: q.device,
        kernels={
            "triton": KernelBackend(
                "block_topk_attention_triton_forward",
                "block_topk_attention_triton_backward",
                AUTOGRAD,
                supports=_triton_supports,
                call=_run,
            ),
        },
        # No GPU measurement yet: the Triton kernels are the only GPU backend (the reference forms
        # the dense Nq x Nk scores). CPU tensors take the reference.
        gpu_order=("triton",),
        cpu_order=(),
        triton_module="fastvision.triton_kernels.block_topk_attention",
        benchmark_module="fastvision.benchmark.block_topk_attention",
    )
)


def block_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_blocks: int,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention in which each block of ``block_size`` queries sees only its ``topk_blocks`` best key blocks.

    Args:
        q: ``[B, H, Nq, D]`` queries; float32, float16 or bfloat16, any strides (the Triton backend
            takes ``D`` in (16, 32, 64, 128)).
        k: ``[B, H, Nk, D]`` keys, same dtype and device as ``q``; ``Nk >= 1``.
        v: ``[B, H, Nk, D]`` values.
        topk_blocks: key blocks per query block, ``>= 1``; ``>= ceil(Nk / block_size)`` is dense attention.
        block_size: rows per block, one of (16, 32, 64, 128); the last block of q and of k may be partial.
        scale: score scale, default ``D ** -0.5``; also scales the block scores.

    Returns:
        ``[B, H, Nq, D]`` tensor of ``q``'s dtype. Block scores ``scale * mean(q[I]) . mean(k[J])``;
        among equal block scores the lower key block is selected first. Math in float32.
    """
    return BLOCK_TOPK_ATTENTION(q, k, v, topk_blocks, block_size, scale)
