"""Post-norm residual LayerNorm: ``LayerNorm(x + residual)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AddLayerNorm(nn.Module):
    """``LayerNorm(x + residual)`` over the last dimension, with the parameters of ``nn.LayerNorm``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x + residual, (self.dim,), self.weight, self.bias, self.eps)
