"""Deployment: torch.export programs, ONNX and TensorRT.

fastvision ops appear in exported graphs as single ``fastvision::*`` nodes. ONNX export maps each
op that has a translation (declared with its backend in ``fastvision.ops.OPS``) to standard ONNX
operators; TensorRT compiles
the graph with the reference lowering of each op (plain aten ops, which TensorRT fuses itself),
because a TensorRT engine cannot call the package's own CUDA or Triton kernels without plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastvision._backend import use_backend
from fastvision.ops._contract import onnx_export_dispatch, onnx_translation_table


def export_program(module: torch.nn.Module, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.export.export`` of ``module`` (eval mode), keeping fastvision ops as single nodes."""
    return torch.export.export(module.eval(), tuple(example_inputs), **kwargs)


def save_program(module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path) -> Path:
    """Export and save a ``.pt2`` archive (load with ``torch.export.load``)."""
    path = Path(path)
    torch.export.save(export_program(module, example_inputs), path)
    return path


def export_onnx(
    module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path, **kwargs: Any
) -> Path:
    """ONNX export through the dynamo exporter; fastvision ops become standard ONNX operators.

    Each op is traced through a backend that declares a translation, else through its reference
    lowering (see ``OpSpec.onnx_backend``), whatever backend would run it eagerly.
    """
    path = Path(path)
    table = onnx_translation_table()
    with onnx_export_dispatch():
        program = torch.onnx.export(
            module.eval(), tuple(example_inputs), dynamo=True, custom_translation_table=table, **kwargs
        )
    program.save(str(path))
    return path


def compile_tensorrt(module: torch.nn.Module, example_inputs: Sequence[Any], **kwargs: Any):
    """Compile with Torch-TensorRT (the ``tensorrt`` extra); the graph uses the reference lowerings."""
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise ImportError(
            "compile_tensorrt needs torch-tensorrt: pip install 'fastvision[tensorrt]' on a CUDA machine"
        ) from exc
    with use_backend("reference"):
        program = export_program(module, example_inputs)
    return torch_tensorrt.dynamo.compile(program, inputs=list(example_inputs), **kwargs)
