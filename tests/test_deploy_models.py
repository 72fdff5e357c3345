"""Deployment of every registered model: torch.export (.pt2 reloaded), ONNX in onnxruntime, the
TensorRT parser's operator table, and torch.compile(fullgraph=True) of the inference entry.

Each model is built with its default weights (seeded), wrapped by ``inference_module`` and fed its
registered ``example_inputs``; exported artifacts are compared with eager on the same inputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastvision import deploy
from fastvision.models import create_model, example_inputs, inference_module, list_models

# Other test modules register test_* models in the same process.
MODELS = [name for name in list_models() if not name.startswith("test_")]
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed"
)

# float32 throughout; exported graphs reorder a few reductions, so outputs agree to rounding.
RELATIVE_TOLERANCE = 1e-4


def _build(name: str):
    torch.manual_seed(0)
    module = inference_module(create_model(name), name)
    inputs = example_inputs(name, batch=2)
    with torch.no_grad():
        expected = module(*inputs)
    return module, inputs, expected


def _assert_matches(expected, got, name: str) -> None:
    leaves = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    difference = deploy.max_abs_difference(expected, got)
    if all(not t.is_floating_point() for t in leaves):
        assert difference == 0, f"{name}: integer outputs differ from eager"
        return
    scale = max(1.0, *(t.abs().max().item() for t in leaves if t.is_floating_point() and t.numel()))
    assert difference <= RELATIVE_TOLERANCE * scale, f"{name}: max |exported - eager| = {difference:.3g}"


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """One ONNX export per model, shared by the onnxruntime and TensorRT-table tests."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            module, inputs, expected = _build(name)
            path = deploy.export(module, inputs, "onnx", tmp_path_factory.mktemp(name) / f"{name}.onnx")
            cache[name] = (path, inputs, expected)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_pt2_round_trip(tmp_path, name):
    module, inputs, expected = _build(name)
    path = deploy.export(module, inputs, "pt2", tmp_path / f"{name}.pt2")
    _assert_matches(expected, deploy.run_exported(path, "pt2", inputs), name)


@needs_onnxruntime
@pytest.mark.parametrize("name", MODELS)
def test_onnx_runs_in_onnxruntime(onnx_files, name):
    import onnx

    path, inputs, expected = onnx_files(name)
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"{name}: non-standard ONNX domains {domains}"
    _assert_matches(expected, deploy.run_exported(path, "onnx", inputs), name)


@needs_onnxruntime
@pytest.mark.parametrize("name", MODELS)
def test_onnx_uses_only_tensorrt_parser_operators(onnx_files, name):
    path, _, _ = onnx_files(name)
    assert deploy.unsupported_onnx_ops(path) == {}


@pytest.mark.parametrize("name", MODELS)
def test_inference_compiles_without_graph_breaks(name):
    module, inputs, expected = _build(name)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(*inputs)
    got = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    _assert_matches(expected, got, name)


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=needs_onnxruntime)])
@pytest.mark.parametrize("name", ["vit_mnist", "sparse_unet_mnist", "mamba_ginr_small"])
def test_dynamic_batch(tmp_path, name, fmt):
    module, inputs, _ = _build(name)
    path = deploy.export(module, inputs, fmt, tmp_path / f"{name}.{fmt}", dynamic_batch=True)
    other = example_inputs(name, batch=5, seed=1)
    with torch.no_grad():
        expected = module(*other)
    _assert_matches(expected, deploy.run_exported(path, fmt, other), name)


def test_pt2_keeps_kernel_ops_as_nodes():
    """An op whose CPU kernel runs eagerly stays one ``fastvision::`` node in the program."""
    module, inputs, _ = _build("mamba_ginr_small")
    program = deploy.export_program(module, inputs)
    targets = {str(node.target) for node in program.graph.nodes}
    assert "fastvision.selective_scan_forward.default" in targets


def test_export_rejects_bad_arguments(tmp_path):
    module, inputs, _ = _build("vit_mnist")
    with pytest.raises(ValueError, match="format must be one of"):
        deploy.export(module, inputs, "tflite", tmp_path / "x")
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        deploy.export(module, inputs[0], "pt2", tmp_path / "x")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        example_inputs("vit_mnist", batch=0)


def test_export_cli_writes_and_checks(tmp_path, capsys):
    from fastvision.cli import main

    out = tmp_path / "vit.pt2"
    assert main(["export", "vit_mnist", "--format", "pt2", "--batch", "2", "--out", str(out)]) == 0
    assert out.exists()
    assert "max |exported - eager|" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", MODELS)
def test_inference_cuda_graphs_capture(name):
    """``mode="reduce-overhead"`` captures the whole inference forward in CUDA graphs: no host sync,
    no data-dependent shape (the sparse encoder traces through MaskedDense, masked_gather takes its
    static ``max_count``)."""
    torch.manual_seed(0)
    module = inference_module(create_model(name).cuda(), name)
    inputs = example_inputs(name, batch=2, device="cuda")
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = module(*inputs)
        for _ in range(3):  # warm-up, record, replay
            got = compiled(*inputs)
    got = [t.clone() for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    leaves = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    for want, have in zip(leaves, got, strict=True):
        if want.is_floating_point():
            torch.testing.assert_close(have, want, atol=2e-3, rtol=2e-3)
        else:
            assert torch.equal(have, want)


def test_export_cli_reports_bad_requests(tmp_path, capsys):
    from fastvision.cli import main

    assert main(["export", "no_such_model", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert main(["export", "vit_mnist", "--format", "tensorrt", "--out", str(tmp_path / "x.ep")]) == 1
        assert "needs torch-tensorrt" in capsys.readouterr().err


def test_max_abs_difference_sees_nan_and_infinities():
    ones = torch.ones(3)
    assert deploy.max_abs_difference(ones, [torch.tensor([1.0, 1.5, 1.0])]) == 0.5
    assert deploy.max_abs_difference(ones, [torch.tensor([1.0, float("nan"), 1.0])]) == float("inf")
    assert deploy.max_abs_difference(ones, [torch.tensor([1.0, float("inf"), 1.0])]) == float("inf")
    same = torch.tensor([float("nan"), float("-inf"), 2.0])
    assert deploy.max_abs_difference(same, [same.clone()]) == 0.0
    assert deploy.max_abs_difference(same, [torch.tensor([float("nan"), float("inf"), 2.0])]) == float("inf")


def test_export_cli_rejects_bad_batch_and_checkpoint(tmp_path, capsys):
    from fastvision.cli import main

    assert main(["export", "vit_mnist", "--batch", "0", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "batch must be a positive int" in capsys.readouterr().err
    missing = tmp_path / "missing.pt"
    assert main(["export", "vit_mnist", "--checkpoint", str(missing), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_inference_module_checks_its_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inference_module(object(), "vit_mnist")
    with pytest.raises(ValueError, match="generate"):
        inference_module(torch.nn.Linear(2, 2), "digit_seq_transformer")
