"""Graph attention over a fixed graph (seed 002: the hexagonal sensor arrays).

``GraphAttention`` is multi-head scaled dot-product attention restricted to each node's graph
neighbours and itself (GAT's anisotropic message passing with dot-product scores). A node mask
(True = hidden) removes hidden nodes as keys, so nothing flows out of them; every node still
attends to itself, so a node with no visible neighbour stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.profiling.ranges import nvtx_range


def check_adjacency(adjacency) -> torch.Tensor:
    if not isinstance(adjacency, torch.Tensor) or adjacency.dtype != torch.bool:
        got = adjacency.dtype if isinstance(adjacency, torch.Tensor) else type(adjacency).__name__
        raise TypeError(f"adjacency must be a bool tensor [N, N], got {got}")
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1] or adjacency.shape[0] < 1:
        raise ValueError(f"adjacency must have shape [N, N] with N >= 1, got {list(adjacency.shape)}")
    return adjacency


class GraphAttention(nn.Module):
    """``forward(x [B, N, dim], mask=None [B, N] bool) -> [B, N, dim]``: each node attends to its
    neighbours in ``adjacency [N, N]`` (bool, symmetric or not: row i lists the nodes i reads) and
    to itself; with ``mask``, hidden nodes are left out as keys."""

    def __init__(self, dim: int, adjacency: torch.Tensor, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.heads = _checks.positive_int("heads", heads)
        _checks.heads_divide(dim, heads)
        self.dropout = _checks.dropout("dropout", dropout)
        adjacency = check_adjacency(adjacency)
        self.num_nodes = adjacency.shape[0]
        self.register_buffer(
            "allowed", adjacency | torch.eye(self.num_nodes, dtype=torch.bool), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_nodes or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape [B, {self.num_nodes}, {self.dim}], got {list(x.shape)}")
        allowed = self.allowed[None]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor [B, N] (True = hidden)")
            if tuple(mask.shape) != (x.shape[0], self.num_nodes):
                raise ValueError(
                    f"mask must have shape [B, N] = {[x.shape[0], self.num_nodes]}, got {list(mask.shape)}"
                )
            eye = torch.eye(self.num_nodes, dtype=torch.bool, device=x.device)
            allowed = allowed & (~mask[:, None, :] | eye)
        with nvtx_range("fastvision.GraphAttention"):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
            )
            return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, nodes={self.num_nodes}"


class GraphAttentionBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x), mask)`` then ``x + mlp(norm(x))`` (GELU, 4x)."""

    def __init__(self, dim: int, adjacency: torch.Tensor, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        hidden = self.dim * _checks.positive_int("mlp_ratio", mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GraphAttention(dim, adjacency, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))
