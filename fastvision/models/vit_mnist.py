"""Encoder-only Vision Transformer for single MNIST digits (seed 001, "Encoder Only Transformer").

28x28 image -> 4x4 patches by a strided convolution (a 7x7 grid, 49 tokens) -> CLS token +
learnable positions -> 4 post-norm transformer blocks -> logits from the CLS token.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvision.models.registry import image_inputs, register_model
from fastvision.nn.transformer import PatchEmbed, TransformerEncoderBlock, init_transformer_weights
from fastvision.profiling.ranges import nvtx_range

# The blocks moved to fastvision.nn.transformer; the names stay importable from here.
__all__ = ["PatchEmbed", "TransformerEncoderBlock", "ViTMNIST", "init_transformer_weights", "vit_mnist"]


class ViTMNIST(nn.Module):
    """ViT classifier; ``forward(images) -> logits [B, num_classes]``.

    ``forward(images, return_attention=True)`` also stores the first block's head-averaged
    attention ``[B, 1 + num_patches, 1 + num_patches]`` in ``self.last_attention`` (token 0 is
    CLS); ``attention_maps(images)`` returns it directly. ``embed(images)`` gives the final CLS
    features ``[B, dim]`` that the classification head reads.
    """

    num_prefix_tokens = 1  # the CLS token precedes the patch tokens

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_mult: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(dim, heads, mlp_mult, dropout, attn_dropout) for _ in range(depth)
        )
        self.head = nn.Linear(dim, num_classes)
        self.last_attention: torch.Tensor | None = None
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def _encode(self, images: torch.Tensor, return_attention: bool):
        x = self._tokens(images)
        attention = None
        for index, block in enumerate(self.blocks):
            if return_attention and index == 0:
                x, attention = block(x, need_weights=True)
            else:
                x = block(x)
        return x, attention

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Final CLS features ``[B, dim]`` (the classification head's input)."""
        return self._encode(images, return_attention=False)[0][:, 0]

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        with nvtx_range("fastvision.ViTMNIST"):
            x, attention = self._encode(images, return_attention)
            if return_attention:
                self.last_attention = attention
            return self.head(x[:, 0])

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """First block's attention averaged over heads, ``[B, 1 + num_patches, 1 + num_patches]``."""
        return self._encode(images, return_attention=True)[1]


@register_model(
    "vit_mnist",
    task="classification",
    dataset="mnist",
    example_inputs=image_inputs(1, 28, density=0.19),
    description="ViT: 4x4 patches (49 tokens) + CLS, 4 post-norm blocks, d_model 128, 4 heads (seed 001)",
    # Seed 001: batch 128, Adam around lr 1e-3 (its reported/expected optimum). The seed names no
    # schedule; a short warm-up + cosine decay keeps the post-norm stack stable early on. Its 8
    # epochs reached 98.45% here; 12 epochs with random shifts of up to 2 pixels reached 99.11%
    # (bench/results/training/vit_mnist_shift).
    train_defaults={
        "epochs": 12,
        "shift_augment": 2,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "scheduler": "cosine",
        "warmup_epochs": 0.5,
        "grad_clip": 1.0,
    },
)
def vit_mnist(**kwargs) -> ViTMNIST:
    return ViTMNIST(**kwargs)
