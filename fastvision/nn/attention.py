"""Multi-head attention on ``F.scaled_dot_product_attention`` with a fused q/k/v projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.profiling.ranges import nvtx_range


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, self- or cross-.

    One ``qkv`` linear layer holds the query, key and value projections stacked as
    ``[3 * dim, dim]``. Self-attention runs it as a single matmul; cross-attention projects the
    queries with the first third and the context with the other two, so both uses share one
    parameter layout (and one state_dict format).

    ``forward(x, context=None, is_causal=False, attn_mask=None, need_weights=False)``:

    * ``x`` ``[B, Lq, dim]``; ``context`` ``[B, Lk, dim]`` (``None``: self-attention);
    * ``is_causal``: query ``i`` sees keys ``0..i`` (top-left aligned, as in SDPA);
    * ``attn_mask``: boolean (True = may attend) or additive float mask broadcastable to
      ``[B, heads, Lq, Lk]``;
    * ``need_weights``: also return the softmax weights averaged over heads, ``[B, Lq, Lk]``.
      Only then is the ``Lq x Lk`` matrix materialised; otherwise SDPA picks a fused
      (flash / memory-efficient) kernel that never forms it.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        dim, heads = _checks.positive_int("dim", dim), _checks.positive_int("heads", heads)
        _checks.heads_divide(dim, heads)
        _checks.dropout("dropout", dropout)
        _checks.boolean("bias", bias)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None):
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[: self.dim], None if bias is None else bias[: self.dim])
            k, v = F.linear(context, weight[self.dim :], None if bias is None else bias[self.dim :]).chunk(
                2, dim=-1
            )
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, length, {self.dim}], got {tuple(x.shape)}")
        if context is not None and (
            context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"context must have shape [{x.shape[0]}, length, {self.dim}], got {tuple(context.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check_inputs(x, context)
        if is_causal and attn_mask is not None:
            raise ValueError("pass either is_causal=True or attn_mask, not both")
        with nvtx_range("fastvision.MultiHeadAttention"):
            q, k, v = self._project(x, context)
            dropout_p = self.dropout if self.training else 0.0
            if need_weights:
                out, weights = self._explicit_attention(q, k, v, is_causal, attn_mask, dropout_p)
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
                )
            batch, _, length, _ = out.shape
            out = self.proj(out.transpose(1, 2).reshape(batch, length, self.dim))
        return (out, weights) if need_weights else out

    def _explicit_attention(self, q, k, v, is_causal, attn_mask, dropout_p):
        """The SDPA math written out, so the (head-averaged) weights can be returned."""
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if is_causal:
            lq, lk = scores.shape[-2:]
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        weights = scores.softmax(dim=-1)
        out = F.dropout(weights, dropout_p) @ v
        return out, weights.mean(dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dropout={self.dropout}"
