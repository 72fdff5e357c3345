"""Prediction heads (seed 002): the masked inpainting head and the heteroscedastic regression head."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.nn.convnext import check_mask
from fastvision.ops.masked_gather import MaskedGather, masked_gather
from fastvision.profiling.ranges import nvtx_range


class InpaintingPrediction(NamedTuple):
    dense: torch.Tensor  # [B, out_channels, H, W]: the prediction at every site
    gathered: MaskedGather  # the prediction at the masked sites, packed per sample


class MaskedInpaintingHead(nn.Module):
    """A 1x1 projection of ``features [B, in_channels, H, W]`` to ``out_channels`` predictions per
    site, then ``fastvision.ops.masked_gather`` of the predictions at the masked sites.

    ``forward(features, mask, max_count=None)`` with ``mask [B, H, W]`` bool (True = masked)
    returns ``InpaintingPrediction(dense, gathered)``: ``gathered.values [B, M, out_channels]`` in
    row-major site order per sample, with ``indices``, ``valid`` and ``counts`` as the op defines
    them. ``max_count`` (here or in the constructor) fixes ``M`` with no device-to-host
    synchronization; ``None`` uses the largest count in the batch.
    """

    def __init__(self, in_channels: int, out_channels: int, max_count: int | None = None):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        if max_count is not None:
            if isinstance(max_count, bool) or not isinstance(max_count, int):
                raise TypeError(f"max_count must be an int or None, got {type(max_count).__name__}")
            if max_count < 0:
                raise ValueError(f"max_count must be >= 0, got {max_count}")
        self.max_count = max_count
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, max_count: int | None = None
    ) -> InpaintingPrediction:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"features must have shape [B, {self.in_channels}, H, W], got {list(features.shape)}"
            )
        check_mask(mask, features)
        with nvtx_range("fastvision.MaskedInpaintingHead"):
            dense = self.proj(features)
            slots = max_count if max_count is not None else self.max_count
            return InpaintingPrediction(dense, masked_gather(dense, mask, slots))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, max_count={self.max_count}"


def _mlp(in_features: int, hidden: int | None, out_features: int) -> nn.Module:
    if hidden is None:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))


class HeteroscedasticHead(nn.Module):
    """Mean and log-variance from two separate networks (no shared parameters), the first of the
    two modifications of faithful heteroscedastic regression (Stirn et al., 2023); the second is
    ``fastvision.nn.losses.faithful_nll_loss``.

    ``forward(x [..., in_features]) -> (mu, log_var)``, each ``[..., out_features]``. Each network
    is ``Linear -> GELU -> Linear`` with ``hidden`` units, or one ``Linear`` when ``hidden=None``.
    """

    def __init__(self, in_features: int, out_features: int = 1, hidden: int | None = 64):
        super().__init__()
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        self.hidden = None if hidden is None else _checks.positive_int("hidden", hidden)
        self.mean = _mlp(in_features, self.hidden, out_features)
        self.log_var = _mlp(in_features, self.hidden, out_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {list(x.shape)}")
        return self.mean(x), self.log_var(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, hidden={self.hidden}"
