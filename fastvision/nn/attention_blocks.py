"""Channel and spatial attention for CNNs (seed 002): squeeze-and-excitation and CBAM."""

from __future__ import annotations

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.profiling.ranges import nvtx_range


def _hidden(channels: int, reduction: int) -> int:
    channels = _checks.positive_int("channels", channels)
    reduction = _checks.positive_int("reduction", reduction)
    if reduction > channels:
        raise ValueError(
            f"reduction must be <= channels (the hidden width is channels // reduction), "
            f"got reduction={reduction}, channels={channels}"
        )
    return channels // reduction


def _check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must have shape [B, {channels}, H, W], got {list(x.shape)}")


class SEBlock(nn.Module):
    """Squeeze-and-excitation: global average pool -> Linear(C -> C // r) -> ReLU -> Linear -> sigmoid,
    then each channel of ``x [B, C, H, W]`` scaled by its weight (the seed's layout)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.channels, self.reduction = channels, reduction
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels)
        with nvtx_range("fastvision.SEBlock"):
            scale = self.fc(x).unsqueeze(-1).unsqueeze(-1)  # [B, C, 1, 1]
            return x * scale

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


class ChannelAttention(nn.Module):
    """CBAM's channel attention: one shared MLP on the average- and the max-pooled features,
    summed, sigmoid: ``[B, C, H, W] -> [B, C, 1, 1]`` weights."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


def _odd_kernel(name: str, kernel_size: int) -> int:
    kernel_size = _checks.positive_int(name, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"{name} must be odd (same-size padding), got {kernel_size}")
    return kernel_size


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: the channel mean and max stacked, a ``k x k`` convolution, sigmoid:
    ``[B, C, H, W] -> [B, 1, H, W]`` weights."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        kernel_size = _odd_kernel("kernel_size", kernel_size)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention (average and max pooling), then
    spatial attention, applied in that order: ``x * Mc(x)``, then ``x' * Ms(x')``.

    The output replaces ``x``; for a residual use as the seed recommends, add it to the input
    (``x + cbam(x)``) or place it inside a residual branch.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        self.channels, self.reduction = channels, reduction
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(_odd_kernel("spatial_kernel", spatial_kernel))
        self.spatial_kernel = spatial_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels)
        with nvtx_range("fastvision.CBAM"):
            x = x * self.channel(x)
            return x * self.spatial(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, spatial_kernel={self.spatial_kernel}"
