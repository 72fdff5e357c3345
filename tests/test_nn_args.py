"""Every module of fastvision.nn checks its constructor arguments: a wrong type raises TypeError, a
value out of range ValueError, and the message names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import fastvision.nn as fnn
from fastvision.nn.moe import TokenRouter

ADJACENCY = torch.ones(4, 4, dtype=torch.bool)
BAD_ARGUMENTS = [
    # (module, args, kwargs, error, argument named in the message)
    (fnn.AddLayerNorm, (-3,), {}, ValueError, "dim"),
    (fnn.AddLayerNorm, (0,), {}, ValueError, "dim"),
    (fnn.AddLayerNorm, (8.0,), {}, TypeError, "dim"),
    (fnn.AddLayerNorm, (True,), {}, TypeError, "dim"),
    (fnn.AddLayerNorm, (8,), {"eps": 0}, ValueError, "eps"),
    (fnn.AddLayerNorm, (8,), {"eps": -1e-5}, ValueError, "eps"),
    (fnn.AddLayerNorm, (8,), {"eps": math.nan}, ValueError, "eps"),
    (fnn.AddLayerNorm, (8,), {"eps": math.inf}, ValueError, "eps"),
    (fnn.AddLayerNorm, (8,), {"eps": "1e-5"}, TypeError, "eps"),
    (fnn.MultiHeadAttention, (0, 1), {}, ValueError, "dim"),
    (fnn.MultiHeadAttention, (8, 0), {}, ValueError, "heads"),
    (fnn.MultiHeadAttention, (8, 3), {}, ValueError, "multiple of heads"),
    (fnn.MultiHeadAttention, (8.0, 2), {}, TypeError, "dim"),
    (fnn.MultiHeadAttention, (8, 2), {"dropout": 1.0}, ValueError, "dropout"),
    (fnn.MultiHeadAttention, (8, 2), {"dropout": math.nan}, ValueError, "dropout"),
    (fnn.MultiHeadAttention, (8, 2), {"dropout": "0.1"}, TypeError, "dropout"),
    (fnn.MultiHeadAttention, (8, 2), {"bias": "yes"}, TypeError, "bias"),
    (fnn.GEGLU, (), {"approximate": "sigmoid"}, ValueError, "approximate"),
    (fnn.GEGLU, (), {"approximate": None}, ValueError, "approximate"),
    (fnn.FeedForward, (0,), {}, ValueError, "dim"),
    (fnn.FeedForward, (8,), {"mult": 0}, ValueError, "mult"),
    (fnn.FeedForward, (8,), {"mult": 1.5}, TypeError, "mult"),
    (fnn.FeedForward, (8,), {"activation": "swish"}, ValueError, "activation"),
    (fnn.FeedForward, (8,), {"dropout": -0.1}, ValueError, "dropout"),
    (fnn.FeedForward, (8,), {"activation": "gelu", "approximate": "fast"}, ValueError, "approximate"),
    (fnn.TopKSparseAttention, (0, 1, 4), {}, ValueError, "dim"),
    (fnn.TopKSparseAttention, (64, -4, 4), {}, ValueError, "heads"),
    (fnn.TopKSparseAttention, (64, 5, 4), {}, ValueError, "multiple of heads"),
    (fnn.TopKSparseAttention, (40, 4, 4), {}, ValueError, "head dim"),
    (fnn.TopKSparseAttention, (64, 4, 0), {}, ValueError, "topk"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"dropout": 1.0}, ValueError, "dropout"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"bias": None}, TypeError, "bias"),
    (TokenRouter, (0, 3, 8), {}, ValueError, "dim"),
    (TokenRouter, (8, 0, 8), {}, ValueError, "num_experts"),
    (TokenRouter, (8, 3, 0), {}, ValueError, "hidden"),
    (fnn.AdaptiveSparseAttentionMoE, (0, 1), {}, ValueError, "dim"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 0), {}, ValueError, "heads"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 3), {}, ValueError, "multiple of heads"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"expert_topk": 8}, TypeError, "expert_topk"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"expert_topk": ()}, ValueError, "expert_topk"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"expert_topk": (4, 0)}, ValueError, "expert_topk"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"routing": "top2"}, ValueError, "routing"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"balance_weight": -1.0}, ValueError, "balance_weight"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"balance_weight": math.inf}, ValueError, "balance_weight"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"dropout": 1.5}, ValueError, "dropout"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"router_hidden": 0}, ValueError, "router_hidden"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"router_hidden": 2.5}, TypeError, "router_hidden"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"output_projection": 1}, TypeError, "output_projection"),
    (fnn.SparseConv2d, (0, 4), {}, ValueError, "in_channels"),
    (fnn.SparseConv2d, (4, -1), {}, ValueError, "out_channels"),
    (fnn.SparseConv2d, (4.0, 4), {}, TypeError, "in_channels"),
    (fnn.SparseConv2d, (4, 4), {"kernel_size": 2}, ValueError, "kernel_size"),
    (fnn.SparseConv2d, (4, 4), {"kernel_size": 0}, ValueError, "kernel_size"),
    (fnn.SparseConv2d, (4, 4), {"dilation": 0}, ValueError, "dilation"),
    (fnn.SparseConv2d, (4, 4), {"bias": "no"}, TypeError, "bias"),
    (fnn.SparseMaxPool2d, (0,), {}, ValueError, "kernel_size"),
    (fnn.SparseMaxPool2d, (2,), {"stride": -1}, ValueError, "stride"),
    (fnn.SparseMaxPool2d, (2.5,), {}, ValueError, "kernel_size"),
    (fnn.ResidualSparseBlock, (0, 4), {}, ValueError, "in_channels"),
    (fnn.ResidualSparseBlock, (4, 0), {}, ValueError, "out_channels"),
    (fnn.ResidualSparseBlock, (4, 4), {"kernel_size": 4}, ValueError, "kernel_size"),
    (fnn.CBAM, (0,), {}, ValueError, "channels"),
    (fnn.CBAM, (16,), {"spatial_kernel": 4}, ValueError, "spatial_kernel"),
    (fnn.ChannelAttention, (16,), {"reduction": 0}, ValueError, "reduction"),
    (fnn.ConvNeXtV2Block, (0,), {}, ValueError, "dim"),
    (fnn.ConvNeXtV2Block, (8,), {"kernel_size": 4}, ValueError, "kernel_size"),
    (fnn.DropPath, (1.0,), {}, ValueError, "p"),
    (fnn.GRN, (0,), {}, ValueError, "dim"),
    (fnn.GRN, (8,), {"eps": 0.0}, ValueError, "eps"),
    (fnn.GraphAttention, (0, ADJACENCY), {}, ValueError, "dim"),
    (fnn.GraphAttention, (8, ADJACENCY), {"heads": 3}, ValueError, "heads"),
    (fnn.GraphAttentionBlock, (8, ADJACENCY), {"mlp_ratio": 0}, ValueError, "mlp_ratio"),
    (fnn.HeteroscedasticHead, (0,), {}, ValueError, "in_features"),
    (fnn.LayerNorm2d, (0,), {}, ValueError, "channels"),
    (fnn.LearnablePositionalEncoding, (0, 8), {}, ValueError, "num_positions"),
    (fnn.MaskedInpaintingHead, (8, 0), {}, ValueError, "out_channels"),
    (fnn.MaskedInpaintingHead, (8, 2), {"max_count": -1}, ValueError, "max_count"),
    (fnn.SEBlock, (16,), {"reduction": 0}, ValueError, "reduction"),
    (fnn.SinusoidalPositionalEncoding, (8, 7), {}, ValueError, "dim"),
    (fnn.SinusoidalPositionalEncoding2d, (4, 4, 6), {}, ValueError, "dim"),
    (fnn.SpatialAttention, (4,), {}, ValueError, "kernel"),
    (fnn.Attention, (0,), {}, ValueError, "query_dim"),
    (fnn.Attention, (8,), {"heads": 0}, ValueError, "heads"),
    (fnn.BiMamba, (0,), {}, ValueError, "d_model"),
    (fnn.CrossAttention, (8, 0), {}, ValueError, "context_dim"),
    (fnn.FeedForwardBlock, (8,), {"mult": 0}, ValueError, "mult"),
    (fnn.GaussianFourierFeatures, (2, 0), {}, ValueError, "num_features"),
    (fnn.GaussianFourierFeatures, (2, 8), {"scale": -1.0}, ValueError, "scale"),
    (fnn.Mamba, (0,), {}, ValueError, "d_model"),
    (fnn.Mamba, (8,), {"d_state": 0}, ValueError, "d_state"),
    (fnn.Mamba, (8,), {"conv_backend": "cudnn"}, ValueError, "conv_backend"),
    (fnn.SelfAttentionBlock, (8,), {"heads": 0}, ValueError, "heads"),
]


@pytest.mark.parametrize(
    "module, args, kwargs, error, argument",
    BAD_ARGUMENTS,
    ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(BAD_ARGUMENTS)],
)
def test_bad_constructor_arguments_name_the_argument(module, args, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        module(*args, **kwargs)


def test_every_module_with_arguments_is_covered():
    covered = {case[0] for case in BAD_ARGUMENTS}
    without_arguments = {fnn.SparseReLU, fnn.SparseToDense}
    exported = {getattr(fnn, name) for name in fnn.__all__}
    modules = {m for m in exported if isinstance(m, type) and issubclass(m, torch.nn.Module)}
    assert modules - without_arguments <= covered


@pytest.mark.parametrize(
    "build",
    [
        lambda: fnn.AddLayerNorm(8, eps=1e-6),
        lambda: fnn.MultiHeadAttention(8, 2, dropout=0.1, bias=False),
        lambda: fnn.GEGLU("tanh"),
        lambda: fnn.FeedForward(8, mult=2, activation="gelu", approximate="tanh", dropout=0.0),
        lambda: fnn.TopKSparseAttention(64, 4, 4, dropout=0.0, bias=False),
        lambda: fnn.AdaptiveSparseAttentionMoE(64, 4, (4, 8), routing="top1", router_hidden=8),
        lambda: fnn.SparseConv2d(3, 4, kernel_size=1, bias=False),
        lambda: fnn.SparseMaxPool2d(2, stride=1),
        lambda: fnn.ResidualSparseBlock(3, 4),
        lambda: fnn.SparseReLU(),
        lambda: fnn.SparseToDense(),
    ],
)
def test_valid_arguments_still_build(build):
    build()
