"""Public functional ops. Each ``<op>`` has ``<op>_reference`` beside it in ``fastvision/ops/<op>.py``,
and its declaration (backends, checks, limits) in ``OPS[<op>]`` (see ``fastvision/ops/_contract.py``)."""

from fastvision.ops._contract import OPS, AutogradRule, KernelBackend, OpSpec, define_op
from fastvision.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference
from fastvision.ops.block_topk_attention import block_topk_attention, block_topk_attention_reference
from fastvision.ops.geglu import geglu, geglu_reference
from fastvision.ops.grn import grn, grn_reference
from fastvision.ops.masked_gather import MaskedGather, masked_gather, masked_gather_reference
from fastvision.ops.selective_scan import selective_scan, selective_scan_reference
from fastvision.ops.sparse_conv2d import sparse_conv2d, sparse_conv2d_reference
from fastvision.ops.sparse_max_pool2d import (
    sparse_max_pool2d,
    sparse_max_pool2d_output_shape,
    sparse_max_pool2d_reference,
)
from fastvision.ops.topk_attention import topk_attention, topk_attention_reference

__all__ = [
    "OPS",
    "MaskedGather",
    "AutogradRule",
    "KernelBackend",
    "OpSpec",
    "add_layer_norm",
    "add_layer_norm_reference",
    "block_topk_attention",
    "block_topk_attention_reference",
    "define_op",
    "geglu",
    "geglu_reference",
    "grn",
    "grn_reference",
    "masked_gather",
    "masked_gather_reference",
    "selective_scan",
    "selective_scan_reference",
    "sparse_conv2d",
    "sparse_conv2d_reference",
    "sparse_max_pool2d",
    "sparse_max_pool2d_output_shape",
    "sparse_max_pool2d_reference",
    "topk_attention",
    "topk_attention_reference",
]
