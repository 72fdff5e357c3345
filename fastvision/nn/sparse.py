"""Modules on :class:`~fastvision.sparse.SparseTensor`: submanifold conv, max-pool, ReLU, residual block.

Each also takes the traceable dense equivalent, :class:`~fastvision.sparse.masked_dense.MaskedDense`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.sparse_conv2d import sparse_conv2d
from fastvision.ops.sparse_max_pool2d import sparse_max_pool2d, sparse_max_pool2d_output_shape
from fastvision.profiling.ranges import nvtx_range
from fastvision.sparse import SparseTensor
from fastvision.sparse.kernel_map import check_kernel_size
from fastvision.sparse.masked_dense import MaskedDense


def _check_sparse(x: object) -> SparseTensor | MaskedDense:
    if not isinstance(x, (SparseTensor, MaskedDense)):
        raise TypeError(
            f"x must be a SparseTensor (SparseTensor.from_dense(...)) or its traceable MaskedDense "
            f"equivalent, got {type(x).__name__}"
        )
    return x


class SparseConv2d(nn.Module):
    """Submanifold ``K x K`` convolution: outputs at the input's active sites, stride 1.

    ``weight`` is ``[K*K, Cin, Cout]`` (offset-major, see ``fastvision.ops.sparse_conv2d``),
    initialised like ``nn.Conv2d``: uniform in ``+-1/sqrt(Cin*K*K)`` for weight and bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, dilation: int = 1
    ):
        super().__init__()
        in_channels = _checks.positive_int("in_channels", in_channels)
        out_channels = _checks.positive_int("out_channels", out_channels)
        kernel_size = _checks.positive_int("kernel_size", kernel_size)
        dilation = _checks.positive_int("dilation", dilation)
        check_kernel_size(kernel_size, dilation)
        _checks.boolean("bias", bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.weight = nn.Parameter(torch.empty(kernel_size * kernel_size, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's kaiming_uniform_(a=sqrt(5)) and bias rule both reduce to this bound.
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor | MaskedDense) -> SparseTensor | MaskedDense:
        _check_sparse(x)
        if isinstance(x, MaskedDense):
            return x.conv2d(self.weight, self.bias, self.kernel_size, self.dilation)
        with nvtx_range("fastvision.SparseConv2d"):
            kernel_map = x.kernel_map(self.kernel_size, self.dilation)
            return x.replace_feats(sparse_conv2d(x.feats, kernel_map, self.weight, self.bias))

    def extra_repr(self) -> str:
        extra = f", dilation={self.dilation}" if self.dilation != 1 else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{extra}, "
            f"bias={self.bias is not None}"
        )


class SparseMaxPool2d(nn.Module):
    """Max over each ``kernel_size`` window of active sites; a window with no active site stays inactive.

    The output spatial shape is ``(H - kernel_size) // stride + 1`` (per axis), as ``nn.MaxPool2d``.
    """

    def __init__(self, kernel_size: int = 2, stride: int | None = None):
        super().__init__()
        stride = kernel_size if stride is None else stride
        kernel_size = _checks.positive_int("kernel_size", kernel_size)
        stride = _checks.positive_int("stride", stride)
        self.kernel_size, self.stride = kernel_size, stride

    def output_shape(self, spatial_shape: tuple[int, int]) -> tuple[int, int]:
        height, width = spatial_shape
        if height < self.kernel_size or width < self.kernel_size:
            raise ValueError(f"spatial_shape {spatial_shape} is smaller than kernel_size {self.kernel_size}")
        return sparse_max_pool2d_output_shape(spatial_shape, self.kernel_size, self.stride)

    def forward(self, x: SparseTensor | MaskedDense) -> SparseTensor | MaskedDense:
        _check_sparse(x)
        if isinstance(x, MaskedDense):
            self.output_shape(x.spatial_shape)
            return x.max_pool2d(self.kernel_size, self.stride)
        with nvtx_range("fastvision.SparseMaxPool2d"):
            out_shape = self.output_shape(x.spatial_shape)
            # A SparseTensor's coordinates are canonical by construction: skip the op's check (a sync).
            coords, feats = sparse_max_pool2d(
                x.coords,
                x.feats,
                kernel_size=self.kernel_size,
                stride=self.stride,
                spatial_shape=x.spatial_shape,
                check_coords=False,
            )
            # The op returns canonical coordinates too: no re-check.
            return SparseTensor(coords, feats, out_shape, x.batch_size, check=False)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class SparseReLU(nn.Module):
    """ReLU of the features; the active sites stay active (a zero feature is still a site)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _check_sparse(x).replace_feats(torch.relu(x.feats))


class SparseToDense(nn.Module):
    """``SparseTensor -> [B, C, H, W]`` with zeros at the inactive sites."""

    def forward(self, x: SparseTensor) -> torch.Tensor:
        return _check_sparse(x).to_dense()


class ResidualSparseBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + shortcut(x))`` with submanifold 3x3 convs.

    The shortcut is the identity, or a 1x1 sparse projection when the channel count changes. All
    convolutions share the input's kernel-map cache: one map per block resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = SparseConv2d(in_channels, out_channels, kernel_size)
        self.conv2 = SparseConv2d(out_channels, out_channels, kernel_size)
        self.shortcut = (
            SparseConv2d(in_channels, out_channels, kernel_size=1, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_sparse(x)
        with nvtx_range("fastvision.ResidualSparseBlock"):
            hidden = self.conv1(x)
            hidden = self.conv2(hidden.replace_feats(torch.relu(hidden.feats)))
            residual = x.feats if self.shortcut is None else self.shortcut(x).feats
            return hidden.replace_feats(torch.relu(hidden.feats + residual))
