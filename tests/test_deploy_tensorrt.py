"""TensorRT: the ONNX parser table, the static ONNX check, and the guards of compile_tensorrt.

TensorRT cannot be installed on the machines this project is built on; the tests that need
torch-tensorrt and a GPU skip with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

import fastvision.deploy.tensorrt as trt_deploy
from fastvision.deploy.tensorrt import (
    TABLE_PATH,
    check_onnx_for_tensorrt,
    check_tensorrt_version,
    compile_tensorrt,
    fastvision_plugin_ops,
    register_tensorrt_plugins,
    tensorrt_onnx_table,
    unsupported_onnx_ops,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_trt_gpu = pytest.mark.skipif(
    not (HAS_TORCH_TENSORRT and torch.cuda.is_available()),
    reason="needs torch-tensorrt and a CUDA GPU (TensorRT cannot be installed on the build machines)",
)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def test_table_loads_with_its_version_and_source():
    table = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    assert table == tensorrt_onnx_table()
    assert table["tensorrt_version"] == "10.15"
    assert table["source"]["repository"] == "onnx/onnx-tensorrt"
    assert table["source"]["file"] == "docs/operators.md"
    assert table["source"]["release"].startswith(table["tensorrt_version"])
    assert table["opset_range"] == [9, 24]
    major, minor = (int(p) for p in table["tensorrt_version"].split("."))
    assert (major, minor) >= (10, 7) and (major, minor) != (10, 14)


@pytest.mark.parametrize(
    "op, supported",
    [
        ("Conv", True),
        ("MatMul", True),
        ("Gemm", True),
        ("Softmax", True),
        ("GatherElements", True),
        ("Gather", True),
        ("Scan", True),
        ("Einsum", True),
        ("TopK", "partial"),
        ("Loop", "partial"),
        ("If", "partial"),
        ("ScatterND", "partial"),
        ("LayerNormalization", "partial"),
        ("CumSum", "partial"),
        ("Unique", False),
        ("SequenceAt", False),
        ("BitShift", False),
    ],
)
def test_table_core_ops(op, supported):
    entry = tensorrt_onnx_table()["operators"][op]
    assert entry["supported"] == supported
    if supported == "partial":
        assert entry["restriction"]
    if supported is not False:
        assert "FP32" in entry["types"]


def test_table_entries_are_well_formed():
    ops = tensorrt_onnx_table()["operators"]
    assert len(ops) > 150
    for name, entry in ops.items():
        assert entry["supported"] in (True, False, "partial"), name
        assert ("restriction" in entry) == (entry["supported"] == "partial"), name
    assert "K" in ops["TopK"]["restriction"]


def test_package_data_declares_the_table():
    tomllib = pytest.importorskip("tomllib")

    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["fastvision.deploy"]
    assert TABLE_PATH.name in data


# --------------------------------------------------------------------------------------------------
# The static ONNX check
# --------------------------------------------------------------------------------------------------


def _value(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _model(nodes, inputs, outputs, initializers=(), domains=(("", 17),), functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid(d, v) for d, v in domains]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _supported_model():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        helper.make_node("Softmax", ["y"], ["p"], axis=-1, name="softmax"),
        helper.make_node("TopK", ["p", "k"], ["v", "i"], axis=-1, name="topk"),
        helper.make_node("GatherElements", ["p", "i"], ["out"], axis=-1, name="gather"),
    ]
    inputs = [_value("x", (2, 3)), _value("w", (3, 3))]
    outputs = [_value("out", (2, 2))]
    return _model(nodes, inputs, outputs, initializers=[k])


def test_supported_graph_passes():
    model = _supported_model()
    onnx.checker.check_model(model)
    assert unsupported_onnx_ops(model) == {}
    report = check_onnx_for_tensorrt(model)
    assert report.ok
    assert set(report.partial) == {"topk"}  # TopK is supported with the table's restriction
    assert "sorted" in report.partial["topk"]


def test_path_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_supported_model(), str(path))
    assert unsupported_onnx_ops(path) == {}
    assert unsupported_onnx_ops(str(path)) == {}


def test_custom_domain_node_is_flagged():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("geglu", ["r"], ["y"], domain="fastvision", name="fv"),
    ]
    model = _model(nodes, [_value("x")], [_value("y")], domains=(("", 17), ("fastvision", 1)))
    expected = {"fv": "fastvision::geglu: custom domain fastvision: needs a plugin"}
    assert unsupported_onnx_ops(model) == expected


def test_operator_absent_from_table_and_marked_unsupported():
    nodes = [
        helper.make_node("NotAnOnnxOperator", ["x"], ["a"], name="absent"),
        helper.make_node("Unique", ["a"], ["b"], name="unique"),
        helper.make_node("Abs", ["b"], ["y"]),  # unnamed, supported
    ]
    model = _model(nodes, [_value("x")], [_value("y")])
    found = unsupported_onnx_ops(model)
    assert set(found) == {"absent", "unique"}
    assert found["absent"] == "NotAnOnnxOperator: not in the TensorRT 10.15 ONNX parser table"
    assert "marked unsupported" in found["unique"]


def _loop_model(body_op="Add", body_domain=""):
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node(body_op, ["acc_in", "acc_in"], ["acc_out"], domain=body_domain, name="inner"),
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _value("acc_in"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("acc_out")],
    )
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [3])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body, name="loop")
    domains = (("", 17),) if body_domain == "" else (("", 17), (body_domain, 1))
    return _model([loop], [_value("x")], [_value("y")], initializers=[trip, cond], domains=domains)


def test_node_inside_loop_body_is_flagged():
    ok = _loop_model()
    onnx.checker.check_model(ok)
    assert unsupported_onnx_ops(ok) == {}
    assert set(check_onnx_for_tensorrt(ok).partial) == {"loop"}  # Loop's restriction is reported

    found = unsupported_onnx_ops(_loop_model("selective_scan", "fastvision"))
    reason = "fastvision::selective_scan: custom domain fastvision: needs a plugin"
    assert found == {"loop/body/inner": reason}
    found = unsupported_onnx_ops(_loop_model("SequenceLength"))
    assert list(found) == ["loop/body/inner"]


def test_nodes_inside_if_branches_and_nested_scan():
    then_graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["t"], name="bad")], "then", [], [_value("t")]
    )
    scan_body = helper.make_graph(
        [helper.make_node("Mystery", ["s_in"], ["s_out"], domain="custom.x", name="deep")],
        "scan_body",
        [_value("s_in", (3,))],
        [_value("s_out", (3,))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Scan", ["x"], ["e"], body=scan_body, num_scan_inputs=1, name="scan")],
        "else",
        [],
        [_value("e")],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if")
    model = _model(
        [node],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), _value("x")],
        [_value("y")],
        domains=(("", 17), ("custom.x", 1)),
    )
    found = unsupported_onnx_ops(model)
    assert set(found) == {"if/then_branch/bad", "if/else_branch/scan/body/deep"}
    assert "custom domain custom.x" in found["if/else_branch/scan/body/deep"]


def test_model_local_function_body_is_checked_not_the_call():
    function = helper.make_function(
        "fastvision",
        "helper_fn",
        ["a"],
        ["b"],
        [helper.make_node("Unique", ["a"], ["b"], name="in_fn")],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    call = helper.make_node("helper_fn", ["x"], ["y"], domain="fastvision", name="call")
    model = _model(
        [call], [_value("x")], [_value("y")], domains=(("", 17), ("fastvision", 1)), functions=[function]
    )
    found = unsupported_onnx_ops(model)
    assert list(found) == ["function fastvision::helper_fn/in_fn"]


def test_ai_onnx_domain_is_standard_and_duplicate_names_are_kept():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], domain="ai.onnx", name="n"),
        helper.make_node("Nope", ["a"], ["b"], name="n"),
        helper.make_node("Nope", ["b"], ["y"], name="n"),
    ]
    found = unsupported_onnx_ops(_model(nodes, [_value("x")], [_value("y")]))
    assert set(found) == {"n", "n#2"}


def test_operators_newer_than_a_target_release():
    nodes = [helper.make_node("RMSNormalization", ["x"], ["y"], name="rms")]
    model = _model(nodes, [_value("x")], [_value("y")], domains=(("", 23),))
    assert unsupported_onnx_ops(model) == {}
    found = unsupported_onnx_ops(model, tensorrt_version="10.8")
    assert "added to the TensorRT ONNX parser in 10.15" in found["rms"]
    assert unsupported_onnx_ops(model, tensorrt_version="10.15.1") == {}


def test_bad_argument_type():
    with pytest.raises(TypeError, match="ModelProto or a file path"):
        unsupported_onnx_ops(42)


def test_exported_fastvision_op_passes_the_table():
    pytest.importorskip("onnxscript")
    from fastvision.deploy import export_onnx
    from fastvision.ops import geglu

    class Net(torch.nn.Module):
        def forward(self, x):
            return geglu(torch.nn.functional.relu(x))

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(Net(), (torch.randn(2, 3, 8),), Path(tmp) / "geglu.onnx")
        assert unsupported_onnx_ops(path) == {}


# --------------------------------------------------------------------------------------------------
# compile_tensorrt guards
# --------------------------------------------------------------------------------------------------


def test_missing_torch_tensorrt_gives_clear_import_error():
    if HAS_TORCH_TENSORRT:
        pytest.skip("torch-tensorrt is installed; its compile path runs on a GPU machine")
    with pytest.raises(ImportError, match=r"torch-tensorrt.*fastvision\[tensorrt\]"):
        compile_tensorrt(torch.nn.Linear(4, 4), (torch.randn(2, 4),))


def _fake_torch_tensorrt(monkeypatch, version, custom_op=None, compile_fn=None):
    fake = types.ModuleType("torch_tensorrt")
    plugins = types.SimpleNamespace(custom_op=custom_op or (lambda name, **kw: None))
    fake.dynamo = types.SimpleNamespace(
        conversion=types.SimpleNamespace(plugins=plugins),
        compile=compile_fn or (lambda *a, **k: pytest.fail("compile must not be reached")),
    )
    fake_trt = types.ModuleType("tensorrt")
    fake_trt.__version__ = version
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(trt_deploy, "_PLUGIN_OUTCOME", {})
    return fake


@pytest.mark.parametrize(
    "version, message",
    [("10.14.1.48", r"10\.14 series is not supported"), ("10.6.0", r"needs TensorRT 10\.7 or newer"),
     ("8.6.1", r"needs TensorRT 10\.7 or newer")],
)  # fmt: skip
def test_tensorrt_version_rejected(monkeypatch, version, message):
    _fake_torch_tensorrt(monkeypatch, version)
    with pytest.raises(RuntimeError, match=message):
        compile_tensorrt(torch.nn.Linear(4, 4), (torch.randn(2, 4),))


@pytest.mark.parametrize("version", ["10.8.0.43", "10.7.0", "10.13.3", "10.15.1", "11.0"])
def test_tensorrt_version_accepted_up_to_cuda(monkeypatch, version):
    check_tensorrt_version(version)
    _fake_torch_tensorrt(monkeypatch, version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        compile_tensorrt(torch.nn.Linear(4, 4), (torch.randn(2, 4),))


def test_cpu_example_inputs_rejected(monkeypatch):
    _fake_torch_tensorrt(monkeypatch, "10.8.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is on cpu"):
        compile_tensorrt(torch.nn.Linear(4, 4), (torch.randn(2, 4),))


def test_plugin_ops_are_forward_ops_of_gpu_backends():
    from fastvision.ops import OPS

    names = fastvision_plugin_ops()
    assert len(names) == len(set(names))
    expected = {
        f"fastvision::{kernel.forward}"
        for spec in OPS.values()
        for backend, kernel in spec.kernels.items()
        if backend in ("cuda", "triton", "reference") and spec.built(backend) is None
    }
    assert set(names) == expected
    for name in names:
        assert hasattr(torch.ops.fastvision, name.split("::")[1])
    assert "fastvision::geglu_triton_forward" in names


def test_plugin_generation_failure_falls_back(monkeypatch, caplog):
    calls = []

    def custom_op(name, supports_dynamic_shapes=False):
        calls.append((name, supports_dynamic_shapes))
        if name == "fastvision::bad_forward":
            raise TypeError("unsupported schema")

    fake = _fake_torch_tensorrt(monkeypatch, "10.8.0", custom_op=custom_op)
    with caplog.at_level("WARNING", logger="fastvision.deploy.tensorrt"):
        report = register_tensorrt_plugins(fake, ops=["fastvision::good_forward", "fastvision::bad_forward"])
    assert report.plugins == ("fastvision::good_forward",)
    assert report.fallback == {"fastvision::bad_forward": "TypeError: unsupported schema"}
    assert calls == [("fastvision::good_forward", True), ("fastvision::bad_forward", True)]
    assert "fastvision::bad_forward" in caplog.text
    # Generation runs once per op per process; the outcome is reused.
    again = register_tensorrt_plugins(fake, ops=["fastvision::good_forward", "fastvision::bad_forward"])
    assert again == report and len(calls) == 2


def test_missing_plugin_api_means_fallback_for_every_op(monkeypatch):
    fake = _fake_torch_tensorrt(monkeypatch, "10.8.0")
    fake.dynamo.conversion = types.SimpleNamespace()
    report = register_tensorrt_plugins(fake, ops=["fastvision::geglu_forward"])
    assert report.plugins == () and set(report.fallback) == {"fastvision::geglu_forward"}


def test_compile_passes_fallback_ops_to_torch_tensorrt(monkeypatch):
    """The plumbing after the CUDA check, with the check stubbed out (no GPU here)."""
    from fastvision.ops import geglu

    captured = {}

    def compile_fn(program, inputs, **kwargs):
        captured.update(program=program, inputs=inputs, kwargs=kwargs)
        return torch.nn.Identity()

    def custom_op(name, supports_dynamic_shapes=False):
        if name == "fastvision::geglu_forward":
            raise RuntimeError("no plugin")

    _fake_torch_tensorrt(monkeypatch, "10.13.0", custom_op=custom_op, compile_fn=compile_fn)
    monkeypatch.setattr(trt_deploy, "_require_cuda", lambda inputs: None)
    monkeypatch.setattr(trt_deploy, "fastvision_plugin_ops", lambda: ("fastvision::geglu_forward",))

    class Net(torch.nn.Module):
        def forward(self, x):
            return geglu(x)

    x = torch.randn(2, 8)
    compiled = compile_tensorrt(Net(), (x,), min_block_size=1, torch_executed_ops=["aten.relu.default"])
    assert captured["inputs"] == [x]
    assert captured["kwargs"]["min_block_size"] == 1
    executed = captured["kwargs"]["torch_executed_ops"]
    assert executed == ["aten.relu.default", torch.ops.fastvision.geglu_forward.default]
    assert compiled.fastvision_plugin_report.fallback.keys() == {"fastvision::geglu_forward"}
    targets = {node.target for node in captured["program"].graph.nodes if node.op == "call_function"}
    assert any(str(t).startswith("fastvision.") for t in targets)


def test_compile_without_plugins_uses_reference_lowering(monkeypatch):
    from fastvision.ops import geglu

    captured = {}

    def compile_fn(program, inputs, **kwargs):
        captured.update(program=program, kwargs=kwargs)
        return torch.nn.Identity()

    def custom_op(name, **kw):
        pytest.fail("no plugin generation with plugins=False")

    _fake_torch_tensorrt(monkeypatch, "10.8.0", custom_op=custom_op, compile_fn=compile_fn)
    monkeypatch.setattr(trt_deploy, "_require_cuda", lambda inputs: None)

    class Net(torch.nn.Module):
        def forward(self, x):
            return geglu(x)

    compiled = compile_tensorrt(Net(), (torch.randn(2, 8),), plugins=False)
    assert "torch_executed_ops" not in captured["kwargs"]
    assert compiled.fastvision_plugin_report.plugins == ()
    targets = {str(n.target) for n in captured["program"].graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("fastvision.") for t in targets)


# --------------------------------------------------------------------------------------------------
# On a GPU machine with torch-tensorrt
# --------------------------------------------------------------------------------------------------


@needs_trt_gpu
def test_compile_geglu_module_with_plugins_matches_eager():
    from fastvision.ops import geglu

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 32)

        def forward(self, x):
            return geglu(self.proj(x))

    net = Net().cuda().eval()
    x = torch.randn(4, 16, device="cuda")
    compiled = compile_tensorrt(net, (x,), min_block_size=1)
    report = compiled.fastvision_plugin_report
    assert set(report.plugins) | set(report.fallback) == set(fastvision_plugin_ops())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-3, atol=1e-3)


@needs_trt_gpu
def test_compile_reference_lowering_matches_eager():
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()).cuda().eval()
    x = torch.randn(4, 16, device="cuda")
    compiled = compile_tensorrt(net, (x,), plugins=False, min_block_size=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-3, atol=1e-3)
