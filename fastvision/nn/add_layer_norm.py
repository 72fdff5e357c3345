"""Residual LayerNorm: ``LayerNorm(x + residual)`` on the fused kernel, optionally returning the sum
(post-norm blocks use the output; pre-norm blocks also take ``x + residual`` from the same pass)."""

from __future__ import annotations

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.add_layer_norm import add_layer_norm
from fastvision.profiling.ranges import nvtx_range


class AddLayerNorm(nn.Module):
    """``LayerNorm(x + residual)`` over the last dimension, with the parameters of ``nn.LayerNorm``.

    ``weight`` and ``bias`` are named as in ``nn.LayerNorm``, so state_dicts move between the two
    (and between backends) unchanged.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        dim = _checks.positive_int("dim", dim)
        _checks.positive_float("eps", eps)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    @classmethod
    def from_layer_norm(cls, layer_norm: nn.LayerNorm) -> AddLayerNorm:
        """An ``AddLayerNorm`` with a copy of ``layer_norm``'s parameters, device, dtype and eps.

        An ``nn.LayerNorm`` without affine parameters (or without a bias) gives a module whose missing
        parameter is ``None``, so the two compute the same thing and have the same state_dict keys.
        """
        shape = tuple(layer_norm.normalized_shape)
        if len(shape) != 1:
            raise ValueError(
                f"layer_norm must normalize over one (the last) dimension, got normalized_shape {shape}"
            )
        module = cls(shape[0], eps=layer_norm.eps)
        for name in ("weight", "bias"):
            param = getattr(layer_norm, name, None)
            if param is None:
                setattr(module, name, None)
            else:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        return module

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, return_residual: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``LayerNorm(x + residual)``; with ``return_residual`` the pair ``(out, x + residual)``, the
        sum from the same pass (a pre-norm block's next residual stream, without a second add)."""
        with nvtx_range("fastvision.AddLayerNorm"):
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps, return_residual)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
