"""Transformer building blocks shared by the seed-001 models (ViT classifier, digit reader).

Patch embedding, post-norm encoder and decoder blocks on the fused add+LayerNorm, and the
ViT-style weight initialisation. The blocks keep their attribute names (``attn``, ``norm1``,
``ff``, ...) so model state_dict keys do not depend on where the classes live.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.nn.add_layer_norm import AddLayerNorm
from fastvision.nn.attention import MultiHeadAttention
from fastvision.nn.geglu import FeedForward
from fastvision.profiling.ranges import nvtx_range

__all__ = ["PatchEmbed", "TransformerDecoderBlock", "TransformerEncoderBlock", "init_transformer_weights"]


def init_transformer_weights(module: nn.Module) -> None:
    """ViT-style initialisation: truncated-normal(0.02) weights, zero biases, unit norm gains."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, AddLayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed(nn.Module):
    """``[B, C, H, W] -> [B, (H/p)*(W/p), dim]``: one strided convolution, tokens in row-major order."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        image_size = _checks.positive_int("image_size", image_size)
        patch_size = _checks.positive_int("patch_size", patch_size)
        in_channels = _checks.positive_int("in_channels", in_channels)
        dim = _checks.positive_int("dim", dim)
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}], got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


def _check_block(dim: int, heads: int, mlp_mult: int, dropout: float, attn_dropout: float) -> None:
    dim, heads = _checks.positive_int("dim", dim), _checks.positive_int("heads", heads)
    _checks.heads_divide(dim, heads)
    _checks.positive_int("mlp_mult", mlp_mult)
    _checks.dropout("dropout", dropout)
    _checks.dropout("attn_dropout", attn_dropout)


class TransformerEncoderBlock(nn.Module):
    """Post-norm block: ``x = LN(attn(x) + x)``; ``x = LN(ff(x) + x)`` (both on fused add+LayerNorm)."""

    def __init__(
        self, dim: int, heads: int, mlp_mult: int = 4, dropout: float = 0.1, attn_dropout: float = 0.0
    ):
        super().__init__()
        _check_block(dim, heads, mlp_mult, dropout, attn_dropout)
        self.attn = MultiHeadAttention(dim, heads, dropout=attn_dropout)
        self.norm1 = AddLayerNorm(dim)
        self.ff = FeedForward(dim, mult=mlp_mult, activation="relu", dropout=dropout)
        self.norm2 = AddLayerNorm(dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        with nvtx_range("fastvision.TransformerEncoderBlock"):
            if need_weights:
                attended, weights = self.attn(x, need_weights=True)
            else:
                attended, weights = self.attn(x), None
            x = self.norm1(attended, x)
            x = self.norm2(self.ff(x), x)
        return (x, weights) if need_weights else x



class TransformerDecoderBlock(nn.Module):
    """Post-norm decoder block: causal self-attention, cross-attention to ``memory``, feed-forward."""

    def __init__(
        self, dim: int, heads: int, mlp_mult: int = 4, dropout: float = 0.1, attn_dropout: float = 0.0
    ):
        super().__init__()
        _check_block(dim, heads, mlp_mult, dropout, attn_dropout)
        self.self_attn = MultiHeadAttention(dim, heads, dropout=attn_dropout)
        self.norm1 = AddLayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads, dropout=attn_dropout)
        self.norm2 = AddLayerNorm(dim)
        self.ff = FeedForward(dim, mult=mlp_mult, activation="relu", dropout=dropout)
        self.norm3 = AddLayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        with nvtx_range("fastvision.TransformerDecoderBlock"):
            x = self.norm1(self.self_attn(x, is_causal=True), x)
            x = self.norm2(self.cross_attn(x, memory), x)
            return self.norm3(self.ff(x), x)
