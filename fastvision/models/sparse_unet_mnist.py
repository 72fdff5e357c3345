"""Sparse-conv U-Net MNIST classifier (seed 000).

Sparse encoder on the nonzero pixels (submanifold convs + sparse max-pool), dense attention
bottleneck at 7x7, dense U-Net decoder with skips densified from the encoder, global-pool head:

    [B,1,28,28] -> SparseTensor.from_dense
      enc1  ResidualSparseBlock(1->32)   28x28   -> skip1 = dense [B,32,28,28]
      pool1 SparseMaxPool2d(2)           14x14
      enc2  ResidualSparseBlock(32->64)  14x14   -> skip2 = dense [B,64,14,14]
      pool2 SparseMaxPool2d(2)           7x7     -> dense [B,64,7,7]
      bottleneck Conv2d(64->128), BottleneckAttention(128), Conv2d(128->64)
      up1 ConvTranspose2d(64->64) 14x14, cat skip2, ResidualDenseBlock(128->64)
      up0 ConvTranspose2d(64->32) 28x28, cat skip1, ResidualDenseBlock(64->32)
      head AdaptiveAvgPool2d(1), Flatten, Linear(32->10), log_softmax

Inputs are images in [0, 1] with an exactly-zero background (the data pipeline's default).

Under ``torch.compile`` and ``torch.export`` the encoder runs on the dense equivalent of its sparse
tensors (:class:`~fastvision.sparse.masked_dense.MaskedDense`: masked dense convs and max-pools,
the same function), since the active sites' count is data-dependent and cannot be traced; eager
execution uses the sparse kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.models.registry import image_inputs, register_model
from fastvision.nn.sparse import ResidualSparseBlock, SparseMaxPool2d
from fastvision.profiling.ranges import nvtx_range
from fastvision.sparse import SparseTensor
from fastvision.sparse.masked_dense import MaskedDense


class ResidualDenseBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; 1x1 conv + BN shortcut if channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("fastvision.ResidualDenseBlock"):
            hidden = F.relu(self.bn1(self.conv1(x)))
            hidden = self.bn2(self.conv2(hidden))
            return F.relu(hidden + self.shortcut(x))


class BottleneckAttention(nn.Module):
    """Pre-norm transformer layer over the ``H*W`` spatial tokens of a ``[B, C, H, W]`` map.

    ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``, with a learned position embedding for the
    ``num_tokens`` tokens (the convolutions around it give only local position cues).
    """

    def __init__(
        self, dim: int, num_heads: int = 4, mlp_ratio: int = 2, num_tokens: int = 49, dropout: float = 0.0
    ):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if height * width != self.position.shape[1]:
            raise ValueError(
                f"BottleneckAttention was built for {self.position.shape[1]} tokens, "
                f"got a {height}x{width} map"
            )
        with nvtx_range("fastvision.BottleneckAttention"):
            tokens = x.flatten(2).transpose(1, 2) + self.position  # [B, H*W, C]
            normed = self.norm1(tokens)
            tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
            tokens = tokens + self.mlp(self.norm2(tokens))
            return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class SparseUNetMNIST(nn.Module):
    """The seed-000 classifier: ``[B, 1, 28, 28]`` images in [0, 1] -> ``[B, 10]`` log-probabilities."""

    def __init__(self, num_classes: int = 10, num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.enc1 = ResidualSparseBlock(1, 32)
        self.pool1 = SparseMaxPool2d(2)
        self.enc2 = ResidualSparseBlock(32, 64)
        self.pool2 = SparseMaxPool2d(2)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(64, 128, 3, padding=1),
            BottleneckAttention(128, num_heads=num_heads, num_tokens=7 * 7, dropout=dropout),
            nn.Conv2d(128, 64, 3, padding=1),
        )
        self.up1 = nn.ConvTranspose2d(64, 64, 2, stride=2)
        self.dec1 = ResidualDenseBlock(128, 64)
        self.up0 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec0 = ResidualDenseBlock(64, 32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (1, 28, 28):
            raise ValueError(f"images must have shape [B, 1, 28, 28], got {tuple(images.shape)}")
        with nvtx_range("fastvision.SparseUNetMNIST.encoder"):
            tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
            x = (MaskedDense if tracing else SparseTensor).from_dense(images)
            x = self.enc1(x)
            skip1 = x.to_dense()  # [B, 32, 28, 28]
            x = self.enc2(self.pool1(x))
            skip2 = x.to_dense()  # [B, 64, 14, 14]
            dense = self.pool2(x).to_dense()  # [B, 64, 7, 7]
        dense = self.bottleneck(dense)
        with nvtx_range("fastvision.SparseUNetMNIST.decoder"):
            dense = self.dec1(torch.cat([self.up1(dense), skip2], dim=1))
            dense = self.dec0(torch.cat([self.up0(dense), skip1], dim=1))
        return F.log_softmax(self.head(dense), dim=1)


@register_model(
    name="sparse_unet_mnist",
    task="classification",
    dataset="mnist",
    example_inputs=image_inputs(1, 28, density=0.19),
    description="sparse-conv encoder, attention bottleneck, dense U-Net decoder; MNIST classifier (seed 000)",
    # The seed fixes the architecture only; these are ordinary AdamW/cosine settings for MNIST.
    train_defaults={
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "optimizer": "adamw",
        "scheduler": "cosine",
        "warmup_epochs": 0.5,
    },
)
def sparse_unet_mnist(**kwargs) -> SparseUNetMNIST:
    return SparseUNetMNIST(**kwargs)
