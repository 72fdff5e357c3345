"""Export paths: torch.export .pt2 round trip and ONNX through onnxruntime."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastvision
from fastvision.deploy import compile_tensorrt, export_onnx, save_program
from fastvision.nn import FeedForward


def _module_and_input():
    torch.manual_seed(0)
    return FeedForward(16, mult=2).eval(), torch.randn(3, 7, 16)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pt2_round_trip(tmp_path, backend):
    module, x = _module_and_input()
    with fastvision.use_backend(backend):
        expected = module(x)
        path = save_program(module, (x,), tmp_path / "ff.pt2")
    loaded = torch.export.load(path).module()
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, approximate):
    import onnxruntime

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), fastvision.nn.GEGLU(approximate)).eval()
    x = torch.randn(3, 7, 16)
    with fastvision.use_backend("cpu"):
        expected = module(x)
        path = export_onnx(module, (x,), tmp_path / "geglu.onnx")
    import onnx

    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Erf" in op_types if approximate == "none" else "Tanh" in op_types
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-5)


def test_tensorrt_missing_gives_clear_error():
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed; its compile path runs in the GPU pass")
    module, x = _module_and_input()
    with pytest.raises(ImportError, match="torch-tensorrt"):
        compile_tensorrt(module, (x,))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
@pytest.mark.parametrize("affine", [True, False])
def test_onnx_add_layer_norm(tmp_path, affine):
    import onnxruntime

    from fastvision.nn import AddLayerNorm

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.norm = AddLayerNorm(16)
            if not affine:
                self.norm.weight, self.norm.bias = None, None

        def forward(self, x):
            return self.norm(self.proj(x), x)

    torch.manual_seed(0)
    module, x = Block().eval(), torch.randn(3, 5, 16)
    with fastvision.use_backend("cpu"):
        expected = module(x)
        path = export_onnx(module, (x,), tmp_path / "norm.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-5)
