"""Deployment: torch.export programs, ONNX and TensorRT.

fastvision ops appear in exported graphs as single ``fastvision::*`` nodes. ONNX export maps each
op that has a translation (``ONNX_TRANSLATIONS``) to standard ONNX operators; TensorRT compiles
the graph with the reference lowering of each op (plain aten ops, which TensorRT fuses itself),
because a TensorRT engine cannot call the package's own CUDA or Triton kernels without plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastvision._backend import use_backend


def export_program(module: torch.nn.Module, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.export.export`` of ``module`` (eval mode), keeping fastvision ops as single nodes."""
    return torch.export.export(module.eval(), tuple(example_inputs), **kwargs)


def save_program(module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path) -> Path:
    """Export and save a ``.pt2`` archive (load with ``torch.export.load``)."""
    path = Path(path)
    torch.export.save(export_program(module, example_inputs), path)
    return path


def _onnx_translations() -> dict:
    """fastvision op overload -> function emitting standard ONNX operators (traced by onnxscript)."""
    from onnxscript import opset18 as op

    def geglu(x, approximate: str = "none"):
        value, gate = op.Split(x, axis=-1, num_outputs=2)
        if approximate == "tanh":
            cubic = op.Mul(op.CastLike(0.044715, gate), op.Mul(gate, op.Mul(gate, gate)))
            inner = op.Mul(op.CastLike(0.7978845608028654, gate), op.Add(gate, cubic))
            phi = op.Mul(op.CastLike(0.5, gate), op.Add(op.CastLike(1.0, gate), op.Tanh(inner)))
        else:
            erf = op.Erf(op.Mul(gate, op.CastLike(0.7071067811865476, gate)))
            phi = op.Mul(op.CastLike(0.5, gate), op.Add(op.CastLike(1.0, gate), erf))
        return op.Mul(value, op.Mul(gate, phi))

    def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5):
        summed = op.Add(x, residual)
        if weight is None:  # LayerNormalization needs a scale
            weight = op.Expand(op.CastLike(1.0, summed), op.Shape(summed, start=-1))
        out, mean, rstd = op.LayerNormalization(summed, weight, bias, axis=-1, epsilon=eps, stash_type=1)
        return out, op.Squeeze(mean, [-1]), op.Squeeze(rstd, [-1])

    translations = {
        "geglu_forward": geglu,
        "geglu_triton_forward": geglu,
        "add_layer_norm_forward": add_layer_norm,
        "add_layer_norm_triton_forward": add_layer_norm,
    }
    table = {}
    for name, translation in translations.items():
        overload = getattr(getattr(torch.ops.fastvision, name, None), "default", None)
        if overload is not None:
            table[overload] = translation
    return table


def export_onnx(
    module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path, **kwargs: Any
) -> Path:
    """ONNX export through the dynamo exporter; fastvision ops become standard ONNX operators.

    Ops without a translation are exported through their reference lowering.
    """
    path = Path(path)
    table = _onnx_translations()
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
