"""Deployment: torch.export programs, ONNX and TensorRT.

``export(module, example_inputs, format, path)`` is the one entry point (``fastvision export MODEL``
on the command line); the registry gives each model's inference module and inputs
(``fastvision.models.inference_module`` and ``example_inputs``).

- ``pt2``: ``torch.export``; each fastvision op is one ``fastvision::*`` node of the backend that
  runs it on the inputs' device (a kernel backend), or its plain-aten lowering where that device
  runs the reference. Loading needs ``import fastvision`` (it registers the ops).
- ``onnx``: the dynamo exporter; every op is written in standard ONNX operators, through the
  translation its backend declares or else through its reference lowering (``OpSpec.onnx_backend``).
- ``tensorrt``: Torch-TensorRT (the ``tensorrt`` extra, a CUDA machine) with TensorRT plugins
  generated from the fastvision ops, falling back to PyTorch for an op without one; or
  ``trtexec --onnx`` on the ONNX graph, whose operators ``check_onnx_for_tensorrt`` checks against
  the TensorRT ONNX parser's table (see ``fastvision.deploy.tensorrt`` and docs/tensorrt.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastvision.deploy.tensorrt import check_onnx_for_tensorrt, compile_tensorrt, unsupported_onnx_ops
from fastvision.ops._contract import onnx_export_dispatch, onnx_translation_table

FORMATS = ("pt2", "onnx", "tensorrt")


def tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in pytree order: how exported outputs are compared."""
    return [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def batch_dynamic_shapes(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple:
    """``dynamic_shapes`` making dim 0 (the batch) of every input one shared symbolic size."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes = tuple({0: batch} for _ in example_inputs)
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return (shapes,)  # forward(*inputs): one argument holding them all
    return shapes


def export_program(
    module: torch.nn.Module, example_inputs: Sequence[Any], *, dynamic_batch: bool = False, **kwargs: Any
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` (eval mode), keeping fastvision ops as single nodes."""
    if dynamic_batch:
        kwargs.setdefault("dynamic_shapes", batch_dynamic_shapes(module, example_inputs))
    return torch.export.export(module.eval(), tuple(example_inputs), **kwargs)


def save_program(
    module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path, *, dynamic_batch: bool = False
) -> Path:
    """Export and save a ``.pt2`` archive (load with ``torch.export.load``)."""
    path = Path(path)
    torch.export.save(export_program(module, example_inputs, dynamic_batch=dynamic_batch), path)
    return path


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    dynamic_batch: bool = False,
    **kwargs: Any,
) -> Path:
    """ONNX export through the dynamo exporter; fastvision ops become standard ONNX operators.

    Each op is traced through a backend that declares a translation, else through its reference
    lowering (see ``OpSpec.onnx_backend``), whatever backend would run it eagerly.
    """
    path = Path(path)
    if dynamic_batch:
        kwargs.setdefault("dynamic_shapes", batch_dynamic_shapes(module, example_inputs))
    table = onnx_translation_table()
    with onnx_export_dispatch():
        program = torch.onnx.export(
            module.eval(), tuple(example_inputs), dynamo=True, custom_translation_table=table, **kwargs
        )
    program.save(str(path))
    return path


def save_tensorrt(module: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path) -> Path:
    """Compile with Torch-TensorRT and save the result as an exported program (``.ep``/``.pt2``).

    The engine calls the fastvision plugins generated at compile time: a process that loads it
    imports fastvision first (which registers the ops the plugins wrap)."""
    compiled = compile_tensorrt(module, example_inputs)  # raises a clear error without torch-tensorrt
    import torch_tensorrt

    path = Path(path)
    torch_tensorrt.save(compiled, str(path), inputs=list(example_inputs))
    return path


def export(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    format: str,  # noqa: A002  (the name users know from the CLI flag)
    path: str | Path,
    *,
    dynamic_batch: bool = False,
) -> Path:
    """Write ``module`` (its ``forward`` on ``example_inputs``) as ``format`` (pt2, onnx, tensorrt).

    The module is put in eval mode (exports are inference programs)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        kind = type(example_inputs).__name__
        raise TypeError(f"example_inputs must be a tuple of the forward's inputs, got {kind}")
    kinds = [type(value).__name__ for value in example_inputs if not isinstance(value, torch.Tensor)]
    if kinds:
        raise TypeError(f"example_inputs must hold tensors only, got {', '.join(kinds)}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if format == "pt2":
            return save_program(module, example_inputs, path, dynamic_batch=dynamic_batch)
        if format == "onnx":
            return export_onnx(module, example_inputs, path, dynamic_batch=dynamic_batch)
        if dynamic_batch:
            raise ValueError("dynamic_batch is not supported for tensorrt: compile one engine per batch size")
        return save_tensorrt(module, example_inputs, path)


def run_exported(path: str | Path, format: str, example_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: A002
    """Load an exported artifact and run it on ``example_inputs``; its outputs, flattened."""
    path = Path(path)
    if format == "pt2":
        return tensor_leaves(torch.export.load(path).module()(*example_inputs))
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {
            meta.name: t.detach().cpu().numpy()
            for meta, t in zip(session.get_inputs(), example_inputs, strict=True)
        }
        return [torch.from_numpy(out) for out in session.run(None, feeds)]
    if format == "tensorrt":
        import torch_tensorrt

        return tensor_leaves(torch_tensorrt.load(str(path)).module()(*example_inputs))
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def max_abs_difference(expected: Any, got: Sequence[torch.Tensor]) -> float:
    """Largest |expected - got| over the flattened outputs (integer outputs compared exactly);
    ``inf`` where one side is NaN or infinite and the other is not."""
    leaves = tensor_leaves(expected)
    if len(leaves) != len(got):
        raise ValueError(f"the exported program returns {len(got)} outputs, eager {len(leaves)}")
    worst = 0.0
    for want, have in zip(leaves, got, strict=True):
        have = have.to(want.device)
        if want.shape != have.shape:
            raise ValueError(f"output shape {tuple(have.shape)} differs from eager {tuple(want.shape)}")
        if not want.numel():
            continue
        want, have = want.double(), have.double()
        if not torch.equal(torch.isnan(want), torch.isnan(have)):
            return float("inf")
        finite = torch.isfinite(want) & torch.isfinite(have)
        if not torch.equal(want[~finite].nan_to_num(), have[~finite].nan_to_num()):
            return float("inf")  # infinities of different signs or places
        if finite.any():
            worst = max(worst, (want[finite] - have[finite]).abs().max().item())
    return worst

__all__ = [
    "FORMATS",
    "check_onnx_for_tensorrt",
    "compile_tensorrt",
    "export",
    "export_onnx",
    "export_program",
    "max_abs_difference",
    "run_exported",
    "save_program",
    "save_tensorrt",
    "tensor_leaves",
    "unsupported_onnx_ops",
]
