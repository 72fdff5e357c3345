"""ConvNeXt V2 building blocks: GRN, the block with FCMAE dense masking, and their helpers.

Masks follow the ops' convention: ``mask [B, H, W]`` bool, True where a site is masked (hidden).
FCMAE's dense masking ("Dense + Binary Masking" in ConvNeXt V2) zeroes the masked sites after every
spatial operation: in ``ConvNeXtV2Block`` after the depthwise convolution and on the residual path,
and ``GRN`` leaves masked sites out of its global response. With ``mask=None`` the same weights run
as a plain dense ConvNeXt V2 (fine-tuning and inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.grn import grn
from fastvision.profiling.ranges import nvtx_range


def check_mask(mask: torch.Tensor, x: torch.Tensor, name: str = "mask") -> None:
    """``mask`` must be a bool ``[B, H, W]`` matching channels-first ``x [B, C, H, W]`` in batch and
    spatial size."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor [B, H, W] (True = masked), got {got}")
    expected = (x.shape[0], x.shape[-2], x.shape[-1])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape [B, H, W] = {list(expected)}, got {list(mask.shape)}")


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ``[B, h, w]`` bool mask resized to ``size`` by nearest-neighbour sampling.

    Upsampling by an integer factor repeats each site (a patch mask becomes a pixel mask);
    downsampling by one keeps one site of each block, which for a mask made of whole blocks
    (a patch mask at any finer resolution) is exact.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask
    resized = F.interpolate(mask.unsqueeze(1).to(torch.float32), size=size, mode="nearest")
    return resized.squeeze(1) > 0.5


def _keep(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 - mask`` as ``[B, 1, H, W]`` in ``like``'s dtype: multiplying by it zeroes masked sites."""
    return (~mask).unsqueeze(1).to(like.dtype)


class DropPath(nn.Module):
    """Stochastic depth: during training, zero a sample's residual branch with probability ``p``
    and scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = _checks.dropout("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first ``[B, C, H, W]`` tensor."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(_checks.positive_int("channels", channels), eps=_checks.positive_float("eps", eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on channels-last ``x [B, H, W, dim]`` (``fastvision.ops.grn``).

    ``Gx = ||x||_2`` over the (unmasked) sites per channel, ``Nx = Gx / (mean_c Gx + eps)``,
    ``out = gamma * (x * Nx) + beta + x``. ``gamma`` and ``beta`` start at zero, so a fresh GRN is
    the identity. ``forward(x, mask=None)``: ``mask [B, H, W]`` bool, True = masked (left out of ``Gx``).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.eps = _checks.positive_float("eps", eps)
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be channels-last [B, H, W, {self.dim}], got {list(x.shape)}")
        if mask is not None:
            check_mask(mask, x.permute(0, 3, 1, 2))
        with nvtx_range("fastvision.GRN"):
            return grn(x, self.gamma, self.beta, self.eps, mask)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class ConvNeXtV2Block(nn.Module):
    """ConvNeXt V2 block: depthwise conv -> LayerNorm -> Linear(4x) -> GELU -> GRN -> Linear -> + input.

    ``forward(x [B, dim, H, W], mask=None)``. With ``mask [B, H, W]`` (True = masked) the block
    applies FCMAE dense masking: the depthwise convolution's output is zeroed at masked sites, GRN
    is told the mask, and the residual path is masked too
    (``input * (1 - mask) + drop_path(branch)``), so no feature leaks out of a masked site.
    ``grn=False`` replaces GRN by the identity (a ConvNeXt V1-style MLP, for ablations).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, *, grn: bool = True):
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        _checks.dropout("drop_path", drop_path)
        kernel_size = _checks.positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size padding), got {kernel_size}")
        self.use_grn = _checks.boolean("grn", grn)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}, H, W], got {list(x.shape)}")
        if mask is not None:
            check_mask(mask, x)
        with nvtx_range("fastvision.ConvNeXtV2Block"):
            shortcut = x
            x = self.dwconv(x)
            if mask is not None:
                x = x * _keep(mask, x)
            x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
            x = self.act(self.pwconv1(self.norm(x)))
            if self.grn is not None:
                x = self.grn(x, mask)
            x = self.pwconv2(x).permute(0, 3, 1, 2)
            if mask is not None:
                shortcut = shortcut * _keep(mask, shortcut)
            return shortcut + self.drop_path(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grn={self.use_grn}"
