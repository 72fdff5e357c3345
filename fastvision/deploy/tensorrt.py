"""TensorRT: compilation through Torch-TensorRT, and a static check of ONNX graphs against the
TensorRT ONNX parser's published operator table.

Two routes lead to a TensorRT engine (see ``docs/tensorrt.md``):

* :func:`compile_tensorrt` — ``torch_tensorrt.dynamo.compile`` of the exported program. Each
  fastvision forward op becomes a TensorRT plugin generated from its registered custom op
  (``torch_tensorrt.dynamo.conversion.plugins.custom_op``, TensorRT 10.7+ Quick Deployable
  Plugins); an op whose plugin generation fails runs in PyTorch instead (``torch_executed_ops``).
* ``trtexec --onnx=model.onnx`` on a graph from ``fastvision.deploy.export_onnx``, which needs no
  plugin when every node is in the parser's table: :func:`unsupported_onnx_ops` checks that
  without TensorRT installed.

The table is ``tensorrt_onnx_ops.json`` beside this file: the ``docs/operators.md`` matrix of
``onnx/onnx-tensorrt`` with its release (:func:`tensorrt_onnx_table` returns it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("tensorrt_onnx_ops.json")
STANDARD_DOMAINS = ("", "ai.onnx")
MIN_TENSORRT = (10, 7)
EXCLUDED_TENSORRT_SERIES = ((10, 14),)
# Backends whose forward ops run on CUDA tensors, i.e. the ones that can appear in a graph exported
# from CUDA inputs. The ``cpu`` backend's ops are skipped unless a CUDA backend shares the op.
_GPU_BACKENDS = ("cuda", "triton", "reference")


# --------------------------------------------------------------------------------------------------
# The ONNX parser table and the static check
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tensorrt_onnx_table() -> dict[str, Any]:
    """The TensorRT ONNX parser's operator table (parsed ``tensorrt_onnx_ops.json``).

    ``operators`` maps each ONNX operator to ``{"supported": True | False | "partial", "types": [...],
    "restriction": "..."}``; ``tensorrt_version`` and ``source`` say which release it is.
    """
    with open(TABLE_PATH, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class TensorRTOnnxReport:
    """Result of :func:`check_onnx_for_tensorrt`.

    ``unsupported``: node -> why TensorRT's ONNX parser cannot take it (these need a plugin or a
    different export). ``partial``: node -> the table's restriction for an operator that is
    supported with restrictions; reported for a person to check, not counted as unsupported.
    Node keys are paths: ``<node>`` in the main graph, ``<loop node>/<attribute>/<node>`` inside
    a subgraph, ``function <domain>::<name>/<node>`` inside a model-local function; a node without
    a name is ``<op_type>_<index>``.
    """

    tensorrt_version: str
    unsupported: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every node is in the table as supported (partial support included)."""
        return not self.unsupported


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"cannot read a TensorRT version from {version!r} (expected e.g. '10.8.0')")
    return int(match.group(1)), int(match.group(2))


def _load_model(model_or_path: Any):
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            "checking an ONNX graph needs the onnx package: pip install 'fastvision[onnx]'"
        ) from exc
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path), load_external_data=False)
    raise TypeError(
        f"model_or_path must be an onnx.ModelProto or a file path, got {type(model_or_path).__name__}"
    )


def check_onnx_for_tensorrt(model_or_path: Any, tensorrt_version: str | None = None) -> TensorRTOnnxReport:
    """Check every node of an ONNX model against the TensorRT ONNX parser's operator table.

    Walks the main graph, the subgraphs of ``Loop``/``Scan``/``If`` (any graph-valued attribute,
    nested to any depth) and the bodies of model-local functions that nodes call (TensorRT's
    parser inlines local functions, so a call node itself is not a table operator).

    A node is unsupported when its domain is not the standard one (``""`` or ``"ai.onnx"``): "custom
    domain <domain>: needs a plugin"; when its operator is absent from the table ("not in the
    TensorRT <version> ONNX parser table") or marked ``N`` there; and, when ``tensorrt_version``
    is given (e.g. ``"10.8"``), when the table's changelog notes say the operator came in a later
    release. Data types and attribute values are not checked.

    Args:
        model_or_path: an ``onnx.ModelProto`` or the path of a ``.onnx`` file (external data is
            not loaded; only the graph structure is read).
        tensorrt_version: the TensorRT release the graph is meant for; default: the table's.
    """
    model = _load_model(model_or_path)
    table = tensorrt_onnx_table()
    operators: dict[str, dict[str, Any]] = table["operators"]
    table_version = table["tensorrt_version"]
    added = {k: v for k, v in table.get("added_since_10_7", {}).items() if not k.startswith("_")}
    target = _version_tuple(tensorrt_version) if tensorrt_version else None
    functions = {(f.domain, f.name): f for f in model.functions}
    report = TensorRTOnnxReport(tensorrt_version=tensorrt_version or table_version)
    visited_functions: set[tuple[str, str]] = set()

    def record(store: dict[str, str], key: str, reason: str) -> None:
        unique, n = key, 1
        while unique in store:
            n += 1
            unique = f"{key}#{n}"
        store[unique] = reason

    def walk(nodes, prefix: str) -> None:
        for index, node in enumerate(nodes):
            label = prefix + (node.name or f"{node.op_type}_{index}")
            domain = node.domain
            op = node.op_type if domain in STANDARD_DOMAINS else f"{domain}::{node.op_type}"
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g.node, f"{label}/{attr.name}/")
                for i, graph in enumerate(attr.graphs):
                    walk(graph.node, f"{label}/{attr.name}[{i}]/")
            if (domain, node.op_type) in functions:
                if (domain, node.op_type) not in visited_functions:
                    visited_functions.add((domain, node.op_type))
                    walk(functions[(domain, node.op_type)].node, f"function {domain}::{node.op_type}/")
                continue
            if domain not in STANDARD_DOMAINS:
                record(report.unsupported, label, f"{op}: custom domain {domain}: needs a plugin")
                continue
            entry = operators.get(node.op_type)
            if entry is None:
                record(
                    report.unsupported, label, f"{op}: not in the TensorRT {table_version} ONNX parser table"
                )
            elif entry["supported"] is False:
                note = f" ({entry['note']})" if entry.get("note") else ""
                record(
                    report.unsupported,
                    label,
                    f"{op}: marked unsupported in the TensorRT {table_version} ONNX parser table{note}",
                )
            elif node.op_type in added and target is not None and target < _version_tuple(added[op]):
                record(
                    report.unsupported,
                    label,
                    f"{op}: added to the TensorRT ONNX parser in {added[node.op_type]}, "
                    f"not in {tensorrt_version}",
                )
            elif entry["supported"] == "partial":
                record(report.partial, label, f"{op}: {entry['restriction']}")

    walk(model.graph.node, "")
    return report


def unsupported_onnx_ops(model_or_path: Any, tensorrt_version: str | None = None) -> dict[str, str]:
    """Node -> reason, for every node of an ONNX model that TensorRT's ONNX parser cannot take.

    An empty dict means ``trtexec --onnx`` needs no plugin for this graph (operator-wise; data
    types and attribute restrictions aside). Partially supported operators are not included: see
    :func:`check_onnx_for_tensorrt`, whose ``partial`` field lists them with the table's
    restriction. Arguments as for :func:`check_onnx_for_tensorrt`.
    """
    return check_onnx_for_tensorrt(model_or_path, tensorrt_version).unsupported


# --------------------------------------------------------------------------------------------------
# Torch-TensorRT
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginReport:
    """Which fastvision ops got TensorRT plugins (``plugins``: ``"fastvision::<op>"`` names) and
    which run in PyTorch instead (``fallback``: name -> why plugin generation failed)."""

    plugins: tuple[str, ...] = ()
    fallback: dict[str, str] = field(default_factory=dict)


def _import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise ImportError(
            "compile_tensorrt needs torch-tensorrt (TensorRT 10.7 or newer, not 10.14.x): "
            "pip install 'fastvision[tensorrt]' on a CUDA machine"
        ) from exc
    return torch_tensorrt


def tensorrt_version(torch_tensorrt: Any = None) -> str:
    """The installed TensorRT version: ``tensorrt.__version__``, else the version torch-tensorrt
    was built against (``torch_tensorrt.__tensorrt_version__``)."""
    try:
        import tensorrt

        version = getattr(tensorrt, "__version__", None)
    except ImportError:
        version = None
    if version is None and torch_tensorrt is not None:
        version = getattr(torch_tensorrt, "__tensorrt_version__", None)
    if version is None:
        raise RuntimeError("cannot determine the TensorRT version: the tensorrt package is not importable")
    return str(version)


def check_tensorrt_version(version: str) -> None:
    """Raise ``RuntimeError`` unless TensorRT ``version`` is 10.7 or newer and not a 10.14 release."""
    found = _version_tuple(version)
    if found < MIN_TENSORRT:
        raise RuntimeError(
            f"TensorRT {version} found; compile_tensorrt needs TensorRT "
            f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (plugin generation from custom ops "
            "uses TensorRT's Quick Deployable Plugins)"
        )
    if found in EXCLUDED_TENSORRT_SERIES:
        raise RuntimeError(
            f"TensorRT {version} found; the {found[0]}.{found[1]} series is not supported by "
            "fastvision: use TensorRT 10.7-10.13 or 10.15 and newer"
        )


def _require_cuda(example_inputs: Sequence[Any]) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "compile_tensorrt needs a CUDA device (TensorRT builds and runs engines on NVIDIA GPUs); "
            "torch.cuda.is_available() is False"
        )
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor) and value.device.type != "cuda":
            raise ValueError(
                f"example_inputs[{i}] is on {value.device}; compile_tensorrt needs CUDA tensors "
                "(move the module and its inputs to the GPU)"
            )


def fastvision_plugin_ops() -> tuple[str, ...]:
    """``"fastvision::<op>"`` for every forward op that a CUDA graph can hold: the forward op of
    each built ``cuda``, ``triton`` or ``reference`` backend registered under ``torch.ops.fastvision``."""
    from fastvision.ops import OPS

    names: list[str] = []
    for spec in OPS.values():
        for backend, kernel in spec.kernels.items():
            if backend not in _GPU_BACKENDS or spec.built(backend) is not None:
                continue
            if not hasattr(torch.ops.fastvision, kernel.forward):
                continue
            name = f"fastvision::{kernel.forward}"
            if name not in names:
                names.append(name)
    return tuple(names)


# Plugin generation registers into process-wide registries once per op: remember the outcome.
_PLUGIN_OUTCOME: dict[str, str | None] = {}


def register_tensorrt_plugins(torch_tensorrt: Any = None, ops: Sequence[str] | None = None) -> PluginReport:
    """Generate a TensorRT plugin and its converter for each fastvision forward op.

    Calls ``torch_tensorrt.dynamo.conversion.plugins.custom_op(name, supports_dynamic_shapes=True)``
    once per op per process (later calls reuse the outcome). An op whose generation raises is
    listed in ``fallback`` with the error and logged as a warning; :func:`compile_tensorrt` runs it
    in PyTorch.

    Args:
        torch_tensorrt: the module (default: import it).
        ops: ``"fastvision::<op>"`` names (default: :func:`fastvision_plugin_ops`).
    """
    if torch_tensorrt is None:
        torch_tensorrt = _import_torch_tensorrt()
    names = tuple(ops) if ops is not None else fastvision_plugin_ops()
    try:
        generate = torch_tensorrt.dynamo.conversion.plugins.custom_op
    except AttributeError:
        generate = None
    plugins: list[str] = []
    fallback: dict[str, str] = {}
    for name in names:
        if name not in _PLUGIN_OUTCOME:
            if generate is None:
                # Not cached: a later torch-tensorrt in the same process is unlikely, but harmless.
                fallback[name] = "this torch-tensorrt has no dynamo.conversion.plugins.custom_op"
                continue
            try:
                generate(name, supports_dynamic_shapes=True)
                _PLUGIN_OUTCOME[name] = None
            except Exception as exc:  # any failure of generation means: run the op in PyTorch
                _PLUGIN_OUTCOME[name] = f"{type(exc).__name__}: {exc}"
        outcome = _PLUGIN_OUTCOME[name]
        if outcome is None:
            plugins.append(name)
        else:
            fallback[name] = outcome
    if plugins:
        logger.info("TensorRT plugins for fastvision ops: %s", ", ".join(plugins))
    if fallback:
        logger.warning(
            "no TensorRT plugin for these fastvision ops; they run in PyTorch: %s",
            "; ".join(f"{name} ({why})" for name, why in fallback.items()),
        )
    return PluginReport(tuple(plugins), fallback)


def _op_overload(name: str):
    namespace, op = name.split("::", 1)
    return getattr(getattr(torch.ops, namespace), op).default


def compile_tensorrt(
    module: torch.nn.Module, example_inputs: Sequence[Any], *, plugins: bool = True, **kwargs: Any
):
    """Compile with Torch-TensorRT (the ``tensorrt`` extra; TensorRT 10.7+, not 10.14.x; a CUDA device).

    With ``plugins=True`` (default) the module is exported as it runs on the GPU, so fastvision ops
    stay single custom-op nodes; each gets a TensorRT plugin generated from the registered op
    (:func:`register_tensorrt_plugins`), and an op whose plugin generation failed is added to
    ``torch_executed_ops`` so it runs in PyTorch (a graph break). With ``plugins=False`` the graph
    is exported with the reference lowerings (plain aten ops) and no plugin is generated.

    Checks, in order: torch-tensorrt importable (``ImportError``), TensorRT version
    (``RuntimeError``), a CUDA device and CUDA example inputs (``RuntimeError``/``ValueError``).

    Returns the module from ``torch_tensorrt.dynamo.compile(program, inputs=..., **kwargs)``, with
    the :class:`PluginReport` as its ``fastvision_plugin_report`` attribute; the fallback ops are
    also logged as a warning.
    """
    from fastvision._backend import use_backend
    from fastvision.deploy import export_program

    torch_tensorrt = _import_torch_tensorrt()
    check_tensorrt_version(tensorrt_version(torch_tensorrt))
    _require_cuda(example_inputs)
    executed = list(kwargs.pop("torch_executed_ops", ()))
    if plugins:
        report = register_tensorrt_plugins(torch_tensorrt)
        for name in report.fallback:
            overload = _op_overload(name)
            if overload not in executed:
                executed.append(overload)
        program = export_program(module, example_inputs)
    else:
        report = PluginReport()
        with use_backend("reference"):
            program = export_program(module, example_inputs)
    if executed:
        kwargs["torch_executed_ops"] = executed
    compiled = torch_tensorrt.dynamo.compile(program, inputs=list(example_inputs), **kwargs)
    with contextlib.suppress(AttributeError):  # a result that takes no attributes: the log has it
        compiled.fastvision_plugin_report = report
    return compiled
