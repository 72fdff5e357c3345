"""Drop-in modules built on fastvision ops."""

from fastvision.nn.add_layer_norm import AddLayerNorm
from fastvision.nn.attention import MultiHeadAttention
from fastvision.nn.geglu import GEGLU, FeedForward
from fastvision.nn.moe import AdaptiveSparseAttentionMoE, TopKSparseAttention
from fastvision.nn.sparse import ResidualSparseBlock, SparseConv2d, SparseMaxPool2d, SparseReLU, SparseToDense

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
]
