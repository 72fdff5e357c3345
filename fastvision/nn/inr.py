"""Building blocks of implicit neural representations (seed 004): Gaussian Fourier features of query
coordinates, cross-attention from queries to latents, and the pre-norm self-attention block of a
latent processor (SDPA attention, GEGLU feed-forward on ``fastvision.ops.geglu``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.nn.geglu import FeedForward
from fastvision.ops.add_layer_norm import add_layer_norm
from fastvision.profiling.ranges import nvtx_range


class GaussianFourierFeatures(nn.Module):
    """``x [..., in_dim] -> [sin(2 pi x B), cos(2 pi x B)]`` of ``[..., 2 * num_features]``.

    ``B [in_dim, num_features]`` is drawn once from ``N(0, scale^2)`` (Tancik et al., 2020) and kept as a
    buffer (``learnable=True`` makes it a parameter). ``scale`` sets the frequency band: coordinates in
    ``[-1, 1]`` with ``scale = 10`` reach about ten periods across the domain.
    """

    def __init__(self, in_dim: int, num_features: int, scale: float = 10.0, learnable: bool = False):
        super().__init__()
        self.in_dim = _checks.positive_int("in_dim", in_dim)
        self.num_features = _checks.positive_int("num_features", num_features)
        self.scale = _checks.positive_float("scale", scale)
        self.learnable = _checks.boolean("learnable", learnable)
        matrix = torch.randn(self.in_dim, self.num_features) * self.scale
        if learnable:
            self.B = nn.Parameter(matrix)
        else:
            self.register_buffer("B", matrix)

    @property
    def out_dim(self) -> int:
        return 2 * self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape [..., {self.in_dim}], got {tuple(x.shape)}")
        projected = 2 * math.pi * (x.to(self.B.dtype) @ self.B)
        return torch.cat((projected.sin(), projected.cos()), dim=-1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_features={self.num_features}, scale={self.scale}"


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = t.shape
    return t.view(batch, length, heads, width // heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value widths (Perceiver's layout).

    ``forward(x [B, Lq, query_dim], context [B, Lk, context_dim] = x) -> [B, Lq, query_dim]``;
    ``heads * dim_head`` is the inner width; scores go through ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.query_dim = _checks.positive_int("query_dim", query_dim)
        self.context_dim = (
            self.query_dim if context_dim is None else _checks.positive_int("context_dim", context_dim)
        )
        self.heads = _checks.positive_int("heads", heads)
        self.dim_head = _checks.positive_int("dim_head", dim_head)
        self.dropout = _checks.dropout("dropout", dropout)
        inner = self.heads * self.dim_head
        self.to_q = nn.Linear(self.query_dim, inner, bias=False)
        self.to_kv = nn.Linear(self.context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, self.query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if x.dim() != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"x must have shape [batch, Lq, {self.query_dim}], got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[-1] != self.context_dim or context.shape[0] != x.shape[0]:
            raise ValueError(
                f"context must have shape [{x.shape[0]}, Lk, {self.context_dim}], got {tuple(context.shape)}"
            )
        q = _heads(self.to_q(x), self.heads)
        k, v = (_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, context_dim={self.context_dim}, heads={self.heads}, "
            f"dim_head={self.dim_head}"
        )


class CrossAttention(nn.Module):
    """Pre-norm cross-attention: ``attn(norm(x), norm_context(context))`` (no residual; the caller adds it).

    ``forward(x [B, Lq, query_dim], context [B, Lk, context_dim]) -> [B, Lq, query_dim]``.
    """

    def __init__(
        self, query_dim: int, context_dim: int, heads: int = 1, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        self.attn = Attention(query_dim, context_dim, heads, dim_head, dropout)
        self.norm = nn.LayerNorm(self.attn.query_dim)
        self.norm_context = nn.LayerNorm(self.attn.context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with nvtx_range("fastvision.CrossAttention"):
            if context.dim() != 3 or context.shape[-1] != self.attn.context_dim:
                raise ValueError(
                    f"context must have shape [batch, Lk, {self.attn.context_dim}], "
                    f"got {tuple(context.shape)}"
                )
            return self.attn(self.norm(x), self.norm_context(context))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ff(norm(x))``.

    Attention: ``heads x dim_head`` on SDPA; feed-forward: GEGLU with ``ff_mult`` expansion
    (``fastvision.nn.FeedForward``, the fused ``geglu`` op). ``[B, L, dim] -> [B, L, dim]``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.norm1 = nn.LayerNorm(self.dim)
        self.attn = Attention(self.dim, None, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(self.dim)
        self.ff = FeedForward(self.dim, mult=_checks.positive_int("ff_mult", ff_mult), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, L, {self.dim}], got {tuple(x.shape)}")
        with nvtx_range("fastvision.SelfAttentionBlock"):
            # norm2(x + attn(...)) and the new residual stream x + attn(...) from one fused pass.
            normed, x = add_layer_norm(
                self.attn(self.norm1(x)), x, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                return_residual=True,
            )
            return x + self.ff(normed)


class FeedForwardBlock(nn.Module):
    """Pre-norm residual GEGLU feed-forward: ``x + ff(norm(x))``, ``[B, L, dim] -> [B, L, dim]``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.norm = nn.LayerNorm(self.dim)
        self.ff = FeedForward(self.dim, mult=_checks.positive_int("mult", mult), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


def coordinate_grid(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel-centre coordinates of a ``height x width`` image in ``[-1, 1]``: ``[height * width, 2]``
    as ``(y, x)`` in row-major order. Centres, not corners, so every resolution samples the same
    continuous square (the convention of ``F.interpolate(..., align_corners=False)``)."""
    height = _checks.positive_int("height", height)
    width = _checks.positive_int("width", width)
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
