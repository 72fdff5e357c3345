"""Every module of fastvision.nn checks its constructor arguments: a wrong type raises TypeError, a
value out of range ValueError, and the message names the argument."""

from __future__ import annotations

import inspect
import math
import re

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
    (fnn.GEGLU, (), {"approximate": None}, TypeError, "approximate"),
    (fnn.GEGLU, (), {"approximate": 1}, TypeError, "approximate"),
    (fnn.FeedForward, (0,), {}, ValueError, "dim"),
    (fnn.FeedForward, (8,), {"mult": 0}, ValueError, "mult"),
    (fnn.FeedForward, (8,), {"mult": 1.5}, TypeError, "mult"),
    (fnn.FeedForward, (8,), {"activation": "swish"}, ValueError, "activation"),
    (fnn.FeedForward, (8,), {"activation": 1}, TypeError, "activation"),
    (fnn.FeedForward, (8,), {"approximate": 0}, TypeError, "approximate"),
    (fnn.FeedForward, (8,), {"dropout": -0.1}, ValueError, "dropout"),
    (fnn.FeedForward, (8,), {"activation": "gelu", "approximate": "fast"}, ValueError, "approximate"),
    (fnn.TopKSparseAttention, (0, 1, 4), {}, ValueError, "dim"),
    (fnn.TopKSparseAttention, (64, -4, 4), {}, ValueError, "heads"),
    (fnn.TopKSparseAttention, (64, 5, 4), {}, ValueError, "multiple of heads"),
    (fnn.TopKSparseAttention, (40, 4, 4), {}, ValueError, "head dim"),
    (fnn.TopKSparseAttention, (64, 4, 0), {}, ValueError, "topk"),
    (fnn.TopKSparseAttention, (64, 4, 2.0), {}, TypeError, "topk"),
    (fnn.TopKSparseAttention, (64, 4, True), {}, TypeError, "topk"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"mode": 1}, TypeError, "mode"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"mode": "tokens"}, ValueError, "mode"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"mode": "block", "block_size": 64.0}, TypeError, "block_size"),
    (fnn.TopKSparseAttention, (64, 4, 4), {"mode": "block", "block_size": 48}, ValueError, "block_size"),
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
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"expert_topk": (4, 2.0)}, TypeError, "expert_topk"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"expert_topk": "48"}, TypeError, "expert_topk"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"routing": "top2"}, ValueError, "routing"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"routing": 1}, TypeError, "routing"),
    (fnn.AdaptiveSparseAttentionMoE, (64, 4), {"mode": None}, TypeError, "mode"),
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
    (fnn.SparseMaxPool2d, (2.5,), {}, TypeError, "kernel_size"),
    (fnn.SparseMaxPool2d, (2.0,), {}, TypeError, "kernel_size"),
    (fnn.SparseMaxPool2d, (2,), {"stride": 1.0}, TypeError, "stride"),
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
    (fnn.Mamba, (8,), {"conv_backend": 1}, TypeError, "conv_backend"),
    (fnn.Mamba, (8,), {"dt_rank": "four"}, ValueError, "dt_rank"),
    (fnn.Mamba, (8,), {"dt_rank": 2.0}, TypeError, "dt_rank"),
    (fnn.BiMamba, (8,), {"conv_backend": 1}, TypeError, "conv_backend"),
    (fnn.SelfAttentionBlock, (8,), {"heads": 0}, ValueError, "heads"),
    (fnn.PatchEmbed, (28, 0, 1, 8), {}, ValueError, "patch_size"),
    (fnn.PatchEmbed, (28, 5, 1, 8), {}, ValueError, "multiple of patch_size"),
    (fnn.PatchEmbed, (28.0, 4, 1, 8), {}, TypeError, "image_size"),
    (fnn.TransformerEncoderBlock, (8, 3), {}, ValueError, "multiple of heads"),
    (fnn.TransformerEncoderBlock, (8, 2), {"mlp_mult": 0}, ValueError, "mlp_mult"),
    (fnn.TransformerEncoderBlock, (8, 2), {"attn_dropout": 1.0}, ValueError, "attn_dropout"),
    (fnn.TransformerDecoderBlock, (8, 0), {}, ValueError, "heads"),
    (fnn.TransformerDecoderBlock, (8, 2), {"dropout": -0.5}, ValueError, "dropout"),
]


def _bad_params():
    params = []
    for i, case in enumerate(BAD_ARGUMENTS):
        params.append(pytest.param(*case, id=f"{case[0].__name__}-{i}"))
    return params


@pytest.mark.parametrize("module, args, kwargs, error, argument", _bad_params())
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


# Every constructor argument of every module, with valid values (the required ones here, the rest
# from the signature's defaults): the sweep below swaps one at a time for a value of a wrong type.
VALID = {
    fnn.AdaptiveSparseAttentionMoE: {"dim": 64, "heads": 4},
    fnn.AddLayerNorm: {"dim": 8},
    fnn.Attention: {"query_dim": 8},
    fnn.BiMamba: {"d_model": 8},
    fnn.CBAM: {"channels": 16},
    fnn.ChannelAttention: {"channels": 16},
    fnn.ConvNeXtV2Block: {"dim": 8},
    fnn.CrossAttention: {"query_dim": 8, "context_dim": 4},
    fnn.DropPath: {},
    fnn.FeedForward: {"dim": 8},
    fnn.FeedForwardBlock: {"dim": 8},
    fnn.GEGLU: {},
    fnn.GRN: {"dim": 8},
    fnn.GaussianFourierFeatures: {"in_dim": 2, "num_features": 8},
    fnn.GraphAttention: {"dim": 8, "adjacency": ADJACENCY},
    fnn.GraphAttentionBlock: {"dim": 8, "adjacency": ADJACENCY},
    fnn.HeteroscedasticHead: {"in_features": 8},
    fnn.LayerNorm2d: {"channels": 8},
    fnn.LearnablePositionalEncoding: {"num_positions": 4, "dim": 8},
    fnn.Mamba: {"d_model": 8},
    fnn.MaskedInpaintingHead: {"in_channels": 8, "out_channels": 2},
    fnn.MultiHeadAttention: {"dim": 8, "heads": 2},
    fnn.PatchEmbed: {"image_size": 28, "patch_size": 4, "in_channels": 1, "dim": 8},
    fnn.ResidualSparseBlock: {"in_channels": 3, "out_channels": 4},
    fnn.SEBlock: {"channels": 16},
    fnn.SelfAttentionBlock: {"dim": 8},
    fnn.SinusoidalPositionalEncoding: {"num_positions": 4, "dim": 8},
    fnn.SinusoidalPositionalEncoding2d: {"height": 4, "width": 4, "dim": 8},
    fnn.SparseConv2d: {"in_channels": 3, "out_channels": 4},
    fnn.SparseMaxPool2d: {},
    fnn.SpatialAttention: {},
    fnn.TopKSparseAttention: {"dim": 64, "heads": 4, "topk": 4},
    fnn.TransformerDecoderBlock: {"dim": 8, "heads": 2},
    fnn.TransformerEncoderBlock: {"dim": 8, "heads": 2},
}


def _wrong_type(annotation: str):
    """A value of a type the annotation does not allow (the README promises TypeError for it)."""
    allowed = {part.strip() for part in annotation.split("|")}
    if "torch.Tensor" in allowed:
        return None
    if allowed & {"str"} and allowed & {"int"}:
        return 2.5
    if "None" in allowed:
        return "3"
    if allowed & {"int", "float"}:
        return "2" if "float" in allowed else 2.0
    if allowed == {"bool"} or allowed == {"str"}:
        return 1
    if any(a.startswith(("tuple", "list")) for a in allowed):
        return 8
    raise AssertionError(f"no wrong-type value for annotation {annotation!r}")


def _sweep():
    cases = []
    for module, required in VALID.items():
        for name, param in inspect.signature(module.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            wrong = _wrong_type(str(param.annotation))
            if wrong is not None:
                label = f"{module.__name__}-{name}"
                cases.append(pytest.param(module, required, name, wrong, id=label))
    return cases


def test_valid_builds_build_and_cover_every_module():
    for module, required in VALID.items():
        module(**required)
    exported = {getattr(fnn, name) for name in fnn.__all__}
    modules = {m for m in exported if isinstance(m, type) and issubclass(m, torch.nn.Module)}
    assert modules - {fnn.SparseReLU, fnn.SparseToDense} <= set(VALID)


@pytest.mark.parametrize("module, required, name, wrong", _sweep())
def test_every_argument_of_a_wrong_type_is_a_type_error(module, required, name, wrong):
    """One argument at a time gets a value of a type it does not take: TypeError naming it."""
    with pytest.raises(TypeError, match=re.escape(name)):
        module(**{**required, name: wrong})
