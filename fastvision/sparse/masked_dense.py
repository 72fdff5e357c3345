"""The dense equivalent of a :class:`~fastvision.sparse.SparseTensor`, for tracing.

A sparse tensor's number of active sites, and with it every shape of its kernel maps, depends on
the input values, so ``torch.compile`` and ``torch.export`` cannot trace it. :class:`MaskedDense`
holds the same map as a ``[B, C, H, W]`` tensor that is zero at the inactive sites plus the
``[B, 1, H, W]`` activity mask: every shape is static. The sparse modules compute the same function
on it with dense operators (exactly, up to float rounding order):

- submanifold convolution: ``F.conv2d`` with the dense weight (see ``fastvision.sparse.kernel_map``),
  read at the active sites, since inactive inputs are zero;
- sparse max-pool: max-pool of the features with ``-inf`` at inactive sites; a window without an
  active site stays inactive (zero);
- elementwise ops on ``feats`` act on the dense tensor; :meth:`replace_feats` re-applies the mask.

The exported or compiled graph then holds Conv/MaxPool/Where instead of the sparse kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskedDense:
    """``feats`` ``[B, C, H, W]`` (zero where inactive) and ``mask`` ``[B, 1, H, W]`` bool.

    Offers the :class:`~fastvision.sparse.SparseTensor` methods the sparse modules use
    (``feats``, ``replace_feats``, ``to_dense``, ``spatial_shape``), with ``feats`` in dense layout.
    """

    __slots__ = ("feats", "mask")

    def __init__(self, feats: torch.Tensor, mask: torch.Tensor):
        self.feats, self.mask = feats, mask

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> MaskedDense:
        """The sites of ``x`` (``[B, C, H, W]``) where any channel is nonzero (as ``SparseTensor``)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor [B, C, H, W], got {getattr(x, 'shape', x)}")
        mask = (x != 0).any(dim=1, keepdim=True)
        # Re-zero the inactive sites through the mask: no gradient reaches them (as with the sparse
        # tensor, which never reads them).
        return cls(torch.where(mask, x, 0.0), mask)

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return (self.feats.shape[2], self.feats.shape[3])

    def replace_feats(self, feats: torch.Tensor) -> MaskedDense:
        """Same sites, new features ``[B, C', H, W]`` (zeroed at the inactive sites)."""
        return MaskedDense(torch.where(self.mask, feats, 0.0), self.mask)

    def to_dense(self) -> torch.Tensor:
        return self.feats

    def conv2d(
        self, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: int, dilation: int
    ) -> MaskedDense:
        """Submanifold convolution with the offset-major ``weight`` ``[K*K, Cin, Cout]``."""
        size = kernel_size
        dense_weight = weight.view(size, size, weight.shape[1], weight.shape[2]).permute(3, 2, 0, 1)
        out = F.conv2d(self.feats, dense_weight, bias, padding=(size // 2) * dilation, dilation=dilation)
        return self.replace_feats(out)

    def max_pool2d(self, kernel_size: int, stride: int) -> MaskedDense:
        """Max over each window's active sites; a window without one is inactive."""
        values = F.max_pool2d(self.feats.masked_fill(~self.mask, float("-inf")), kernel_size, stride)
        mask = F.max_pool2d(self.mask.to(self.feats.dtype), kernel_size, stride) > 0
        return MaskedDense(torch.where(mask, values, 0.0), mask)
