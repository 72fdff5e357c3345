"""Drop-in modules built on fastvision ops."""

from fastvision.nn.add_layer_norm import AddLayerNorm
from fastvision.nn.attention import MultiHeadAttention
from fastvision.nn.geglu import GEGLU, FeedForward

__all__ = ["GEGLU", "AddLayerNorm", "FeedForward", "MultiHeadAttention"]
