"""Drop-in modules built on fastvision ops."""

from fastvision.nn.add_layer_norm import AddLayerNorm
from fastvision.nn.attention import MultiHeadAttention
from fastvision.nn.attention_blocks import CBAM, ChannelAttention, SEBlock, SpatialAttention
from fastvision.nn.convnext import GRN, ConvNeXtV2Block, DropPath, LayerNorm2d
from fastvision.nn.geglu import GEGLU, FeedForward
from fastvision.nn.graph import GraphAttention, GraphAttentionBlock
from fastvision.nn.heads import HeteroscedasticHead, InpaintingPrediction, MaskedInpaintingHead
from fastvision.nn.inr import (
    Attention,
    CrossAttention,
    FeedForwardBlock,
    GaussianFourierFeatures,
    SelfAttentionBlock,
    coordinate_grid,
)
from fastvision.nn.losses import beta_nll_loss, faithful_nll_loss
from fastvision.nn.mamba import BiMamba, Mamba
from fastvision.nn.moe import AdaptiveSparseAttentionMoE, TopKSparseAttention
from fastvision.nn.positional import (
    LearnablePositionalEncoding,
    SinusoidalPositionalEncoding,
    SinusoidalPositionalEncoding2d,
    sinusoidal_pos_embed,
    sinusoidal_pos_embed_2d,
)
from fastvision.nn.sparse import ResidualSparseBlock, SparseConv2d, SparseMaxPool2d, SparseReLU, SparseToDense
from fastvision.nn.transformer import (
    PatchEmbed,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
    init_transformer_weights,
)

__all__ = [
    "AdaptiveSparseAttentionMoE",
    "TopKSparseAttention",
    "GEGLU",
    "AddLayerNorm",
    "FeedForward",
    "MultiHeadAttention",
    "ResidualSparseBlock",
    "SparseConv2d",
    "SparseMaxPool2d",
    "SparseReLU",
    "SparseToDense",
    "CBAM",
    "ChannelAttention",
    "ConvNeXtV2Block",
    "DropPath",
    "GRN",
    "GraphAttention",
    "GraphAttentionBlock",
    "HeteroscedasticHead",
    "InpaintingPrediction",
    "LayerNorm2d",
    "LearnablePositionalEncoding",
    "MaskedInpaintingHead",
    "SEBlock",
    "SinusoidalPositionalEncoding",
    "SinusoidalPositionalEncoding2d",
    "SpatialAttention",
    "Attention",
    "BiMamba",
    "CrossAttention",
    "FeedForwardBlock",
    "GaussianFourierFeatures",
    "Mamba",
    "SelfAttentionBlock",
    "coordinate_grid",
    "beta_nll_loss",
    "faithful_nll_loss",
    "sinusoidal_pos_embed",
    "sinusoidal_pos_embed_2d",
    "PatchEmbed",
    "TransformerDecoderBlock",
    "TransformerEncoderBlock",
    "init_transformer_weights",
]
