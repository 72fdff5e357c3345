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

``causal=True`` (video, autoregressive decoders), with the alignment of
``F.scaled_dot_product_attention(..., is_causal=True)``: the upper-left one,
``torch.tril(torch.ones(Nq, Nk))`` (``torch.nn.attention.bias.causal_upper_left``), query ``i`` sees
keys ``j <= i`` whatever ``Nq`` and ``Nk`` are (for ``Nq > Nk`` the queries past ``Nk`` see every key;
for ``Nq < Nk`` the keys past ``Nq`` are seen by none). Two masks, as in native sparse attention:

- block level: query block ``I`` selects only among key blocks ``J <= I`` (the diagonal block is
  always eligible; its score competes like any other), at most ``min(topk_blocks, I + 1)`` of them;
- token level: within the selected blocks, ``j <= i`` (only the diagonal block is cut).

Block rows start at 0 for queries and keys alike, so the blocks are aligned: every query of block
``I`` sees key ``J * block_size`` of each eligible block, and no softmax row is empty. The block
scores use the means of whole blocks (the diagonal key block's mean includes keys after some of the
block's queries): selection is block-causal, the attention token-causal.

Backends: ``reference`` (below: block means, block scores and a dense masked softmax in float32;
O(Nq * Nk) memory) and ``triton`` (triton_kernels/block_topk_attention.py: block means, selection,
and flash attention over the selected key blocks only, cost O(Nq * topk_blocks * block_size * D);
a backward without atomics, bit-identical from run to run), both causal and not. ONNX export traces
the reference (standard operators; ``causal`` is a fixed attribute of the exported call).
"""

from __future__ import annotations

import torch

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


def _causal_mask(num_rows: int, num_columns: int, device: torch.device) -> torch.Tensor:
    """``[rows, columns]`` boolean ``column <= row``: SDPA's ``is_causal`` (upper-left) alignment."""
    rows = torch.arange(num_rows, device=device)
    return torch.arange(num_columns, device=device)[None, :] <= rows[:, None]


def block_selection_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    topk_blocks: int,
    block_size: int,
    scale: float,
    causal: bool = False,
):
    """``[B, H, Nqb, Nkb]`` boolean: the key blocks each query block selects (the definition).
    Causal: among the key blocks ``J <= I`` only (at most ``min(topk_blocks, I + 1)`` blocks)."""
    with torch.no_grad():
        block_scores = (_block_means(q, block_size) @ _block_means(k, block_size).transpose(-2, -1)) * scale
        if not causal:
            return _selection_mask(block_scores, topk_blocks)
        eligible = _causal_mask(block_scores.shape[-2], block_scores.shape[-1], q.device)
        block_scores = block_scores.masked_fill(~eligible, float("-inf"))
        return _selection_mask(block_scores, topk_blocks) & eligible


def _token_mask(block_mask, block_size, num_queries, num_keys, causal):
    token_mask = _expand_blocks(block_mask, block_size, num_queries, num_keys)
    if causal:
        token_mask = token_mask & _causal_mask(num_queries, num_keys, block_mask.device)
    return token_mask


def _masked_attention(q, k, v, token_mask, scale):
    scores = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(scores.masked_fill(~token_mask, float("-inf")), dim=-1) @ v


@without_autocast
def block_topk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_blocks: int,
    block_size: int = 64,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """The definition, in plain PyTorch with float32 math (differentiable; memory O(Nq * Nk) per head)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    selected = block_selection_mask(qc.detach(), kc.detach(), topk_blocks, block_size, scale, causal)
    token_mask = _token_mask(selected, block_size, q.shape[-2], k.shape[-2], causal)
    return _masked_attention(qc, kc, vc, token_mask, scale).to(q.dtype)


def _backward_op_reference(grad_out, q, k, v, out, lse, indices, block_size, scale, causal):
    """The backward op's definition over the saved selection, differentiable (the higher-order rule).
    Causal: the token mask ``j <= i`` also removes the entries past a query block's eligible ones."""
    compute = torch.promote_types(q.dtype, torch.float32)
    num_query_blocks = indices.shape[2]
    num_key_blocks = -(-k.shape[2] // block_size)
    if indices.shape[-1] == 0:
        block_mask = torch.ones(num_query_blocks, num_key_blocks, dtype=torch.bool, device=q.device)
    else:
        block_mask = torch.zeros((*indices.shape[:3], num_key_blocks), dtype=torch.bool, device=q.device)
        block_mask.scatter_(-1, indices.long(), True)
    token_mask = _token_mask(block_mask, block_size, q.shape[2], k.shape[2], causal)
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_blocks: int,
    block_size: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse, indices)``: the log-sum-exp per query and the selected key blocks per query
    block (``[B, H, Nqb, topk_blocks]`` int32, best first, causal: the eligible ones first;
    ``[B, H, Nqb, 0]`` when every block is selected)."""
    from fastvision.triton_kernels.block_topk_attention import block_topk_attention_forward

    return block_topk_attention_forward(q, k, v, topk_blocks, block_size, scale, causal)


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
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvision.triton_kernels.block_topk_attention import block_topk_attention_backward

    return block_topk_attention_backward(grad_out, q, k, v, out, lse, indices, block_size, scale, causal)


def _forward_fake(q, k, v, topk_blocks, block_size, scale, causal):
    batch, heads, num_queries, _ = q.shape
    num_query_blocks = (num_queries + block_size - 1) // block_size
    num_key_blocks = (k.shape[2] + block_size - 1) // block_size
    num_selected = topk_blocks if topk_blocks < num_key_blocks else 0
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, heads, num_queries), dtype=torch.float32),
        q.new_empty((batch, heads, num_query_blocks, num_selected), dtype=torch.int32),
    )


def _backward_fake(grad_out, q, k, v, out, lse, indices, block_size, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _topk_blocks, block_size, scale, causal = inputs
    out, lse, indices = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.block_size, ctx.scale, ctx.causal = block_size, scale, causal
    ctx.mark_non_differentiable(lse, indices)


def _backward(ctx, backward_op, grad_out, _grad_lse, _grad_indices):
    q, k, v, out, lse, indices = ctx.saved_tensors
    # The backward op is not differentiable in ``out`` (AUTOGRAD.backward_differentiable): passing it
    # detached keeps a higher-order gradient from walking back into this forward node, which torch
    # 2.11 runs with zero gradients after its saved tensors were freed (opcheck's AOT check fails).
    dq, dk, dv = backward_op(
        grad_out, q, k, v, out.detach(), lse, indices, ctx.block_size, ctx.scale, ctx.causal
    )
    return dq, dk, dv, None, None, None, None




# --- public op ------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check(q, k, v, topk_blocks, block_size=64, scale=None, causal=False):
    check_attention_inputs(q, k, v)
    if q.shape[3] == 0:
        raise ValueError("head dim D (last dim of q, k, v) must be >= 1")
    _check_int("topk_blocks", topk_blocks, 1)
    _check_int("block_size", block_size, 1)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    check_scale(scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return q, k, v, topk_blocks, block_size, scale, causal


def _triton_supports(q, k, v, topk_blocks, block_size, scale, causal):
    if q.shape[3] not in TRITON_HEAD_DIMS:
        return f"the triton backend takes head dims {TRITON_HEAD_DIMS}, got D = {q.shape[3]}"
    return None


def _check_forward_op(q, k, v, topk_blocks, block_size, scale, causal) -> None:
    """The forward op's own arguments: the public op's, and the Triton kernels' head dims."""
    checked = _check(q, k, v, topk_blocks, block_size, scale, causal)
    check_float("scale", scale)
    reason = _triton_supports(*checked)
    if reason is not None:
        raise ValueError(reason)


def _check_backward_op(grad_out, q, k, v, out, lse, indices, block_size, scale, causal) -> None:
    """The backward op's own arguments: block indices in [0, ceil(Nk / block_size))."""
    _check_forward_op(q, k, v, 1, block_size, scale, causal)
    rows, columns = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
    check_attention_backward(grad_out, q, k, v, out, lse, indices, rows, columns)

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


def _run(forward_op, q, k, v, topk_blocks, block_size, scale, causal):
    return forward_op(q, k, v, topk_blocks, block_size, scale, causal)[0]


def _causal_selected_keys(num_queries: int, num_keys: int, topk_blocks: int, block_size: int) -> int:
    """Sum over queries of the keys the kernels score in a causal call: each query of block ``I``
    scores ``min(topk_blocks, I + 1)`` whole blocks (the diagonal one counted whole, as the kernels
    compute it before the in-block mask), at most ``Nk`` keys."""
    total = 0
    for block in range(-(-num_queries // block_size)):
        rows = min(block_size, num_queries - block * block_size)
        total += rows * min(min(topk_blocks, block + 1) * block_size, num_keys)
    return total


def _cost(q, k, v, topk_blocks, block_size, scale, causal=False) -> OpCost:
    """Read q, k, v and write out once; FLOPs of scores and weighted sum over the selected keys,
    ``4 B H Nq min(topk_blocks block_size, Nk) D`` (block selection not counted); causal: over the
    keys each query sees (``_causal_selected_keys``)."""
    batch, heads, num_queries, head_dim = q.shape
    moved = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
    if causal:
        pairs = _causal_selected_keys(num_queries, k.shape[2], topk_blocks, block_size)
    else:
        pairs = num_queries * min(topk_blocks * block_size, k.shape[2])
    return OpCost(moved, 4 * batch * heads * pairs * head_dim)


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
    causal: bool = False,
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
        causal: query ``i`` sees keys ``j <= i`` only, aligned as ``F.scaled_dot_product_attention``'s
            ``is_causal=True`` (upper left: ``torch.tril(torch.ones(Nq, Nk))``, also for ``Nq != Nk``);
            query block ``I`` selects among key blocks ``J <= I`` only (the module docstring).

    Returns:
        ``[B, H, Nq, D]`` tensor of ``q``'s dtype. Block scores ``scale * mean(q[I]) . mean(k[J])``;
        among equal block scores the lower key block is selected first. Math in float32.
    """
    return BLOCK_TOPK_ATTENTION(q, k, v, topk_blocks, block_size, scale, causal)
