"""Per-op ONNX export: every op in ``fastvision.ops.OPS``, every non-empty float32 sample.

Each sample's op call is wrapped in a small module (its tensor arguments are the graph inputs, the
rest fixed attributes), exported with :func:`fastvision.deploy.export_onnx`, run in onnxruntime on
the CPU and compared with the float64 reference (cast) within the op's stated tolerance; integer and
bool outputs must be equal. The graph (subgraphs and local functions included) must hold only
standard-domain nodes (``""`` / ``ai.onnx``); the op types of each export are printed (``-s``).

An op or sample that cannot be exported is declared in ``ONNX_UNSUPPORTED`` with the reason, and its
case is a strict xfail: an op that starts exporting, or a new op that fails, shows up.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from op_samples import SAMPLES, Sample

import fastvision
from fastvision.deploy import export_onnx
from fastvision.ops import OPS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnxruntime and onnxscript are needed for ONNX export tests",
)

STANDARD_DOMAINS = {"", "ai.onnx"}

# Ops (every sample) or (op, sample label) pairs that do not export to standard ONNX, and why.
ONNX_UNSUPPORTED: dict[str | tuple[str, str], str] = {
    "sparse_max_pool2d": "its output sites are data-dependent at every step: the reference cannot be "
    "traced (reference_traceable=False) and the cpu/cuda kernel ops have no ONNX translation",
}

# (atol, rtol) of ONNX Runtime (float32) against the float64 reference, per op: the shared harness's
# float32 tolerance times the op's float32 sample scale (tests/op_samples.py). Measured with these
# samples: at most 1.5e-6 absolute for every op; masked_gather is a copy and must be exact.
ONNX_TOLERANCE: dict[str, tuple[float, float]] = {
    "geglu": (1e-5, 1e-5),
    "add_layer_norm": (1e-5, 1e-5),
    "topk_attention": (2e-5, 2e-5),
    "block_topk_attention": (2e-5, 2e-5),
    "grn": (1e-5, 1e-5),
    "masked_gather": (0.0, 0.0),
    "selective_scan": (4e-5, 4e-5),  # a float32 state carried over L steps
    "sparse_max_pool2d": (0.0, 0.0),
    "sparse_conv2d": (1e-5, 1e-5),
}


def _tensor_outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensor_outputs(item)]
    return []


def _is_empty(sample: Sample) -> bool:
    return any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in sample.args)


def _params():
    params = []
    for name in OPS:
        for sample in SAMPLES[name](torch.float32):
            if _is_empty(sample):
                continue
            reason = ONNX_UNSUPPORTED.get(name, ONNX_UNSUPPORTED.get((name, sample.label)))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(name, sample.label, id=f"{name}-{sample.label}", marks=marks))
    return params


class _Call(torch.nn.Module):
    """The op with its tensor arguments as inputs and every other argument fixed."""

    def __init__(self, name: str, sample: Sample):
        super().__init__()
        self.name, self.args = name, sample.args
        self.positions = [i for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor)]

    def forward(self, *inputs):
        args = list(self.args)
        for i, value in zip(self.positions, inputs, strict=True):
            args[i] = value
        return tuple(_tensor_outputs(getattr(fastvision.ops, self.name)(*args)))


def nodes(graph):
    """Every node of ``graph`` and its subgraphs (Loop/Scan/If bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from nodes(attribute.g)
            for sub in attribute.graphs:
                yield from nodes(sub)


def check_standard(path) -> tuple[list[str], object]:
    """The sorted op types of the ONNX model at ``path``, asserting standard domains only."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    found = list(nodes(model.graph))
    for function in model.functions:
        for node in function.node:
            found.append(node)
    custom = {(n.domain, n.op_type) for n in found if n.domain not in STANDARD_DOMAINS}
    assert not custom, f"non-standard ONNX nodes: {sorted(custom)}"
    return sorted({n.op_type for n in found}), model


def run_onnxruntime(path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), (names, [tuple(t.shape) for t in inputs])
    feed = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs, strict=True)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _reference(name: str, sample: Sample) -> list[torch.Tensor]:
    spec = OPS[name]
    checked = spec.check(*sample.args)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in checked]
    return _tensor_outputs(spec.reference(*wide))


@pytest.mark.parametrize("name, label", _params())
def test_op_exports_to_onnx(name, label, tmp_path, record_property):
    sample = next(s for s in SAMPLES[name](torch.float32) if s.label == label)
    module = _Call(name, sample).eval()
    inputs = [sample.args[i] for i in module.positions]
    path = export_onnx(module, inputs, tmp_path / f"{name}.onnx")
    op_types, _ = check_standard(path)
    print(f"\n{name}[{label}] ONNX operators: {', '.join(op_types)}")
    record_property("onnx_operators", " ".join(op_types))
    outputs = run_onnxruntime(path, inputs)
    expected = _reference(name, sample)
    assert_matches(outputs, expected, *ONNX_TOLERANCE[name])


def assert_matches(outputs, expected, atol: float, rtol: float) -> None:
    """ONNX Runtime's outputs against the float64 reference's: floats within (atol, rtol), the rest equal."""
    assert len(outputs) == len(expected)
    for out, want in zip(outputs, expected, strict=True):
        assert tuple(out.shape) == tuple(want.shape)
        if want.is_floating_point():
            torch.testing.assert_close(out.double(), want.double(), atol=atol, rtol=rtol)
        else:
            assert out.dtype == want.dtype
            assert torch.equal(out, want)


def test_declared_lists_name_real_ops():
    for key in ONNX_UNSUPPORTED:
        name = key if isinstance(key, str) else key[0]
        assert name in OPS, key
        if not isinstance(key, str):
            assert any(s.label == key[1] for s in SAMPLES[name](torch.float32)), key
    assert set(ONNX_TOLERANCE) == set(OPS)


# --- selective_scan: one Scan, whatever the sequence length --------------------------------------------


def _scan_inputs(length: int, bc: str, seed: int, batch: int = 2, dim: int = 4, state: int = 3):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    shapes = {"fixed": (dim, state), "varying": (batch, state, length), "grouped": (batch, 2, state, length)}
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, state, generator=generator) - 0.1,
        "B": randn(*shapes[bc]),
        "C": randn(*shapes["varying" if bc == "fixed" else bc]),  # fixed B with varying C: mixed forms
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": randn(dim, scale=0.1),
    }


class _Scan(torch.nn.Module):
    def __init__(self, names: list[str], delta_softplus: bool):
        super().__init__()
        self.names, self.delta_softplus = names, delta_softplus

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors, strict=True))
        scan = fastvision.ops.selective_scan
        return scan(**kwargs, delta_softplus=self.delta_softplus, return_last_state=True)


def _scan_reference(inputs: dict, delta_softplus: bool):
    wide = {k: v.double() for k, v in inputs.items()}
    reference = fastvision.ops.selective_scan_reference
    return list(reference(**wide, delta_softplus=delta_softplus, return_last_state=True))


@pytest.mark.parametrize(
    "bc, optional, delta_softplus",
    [
        ("varying", ("D", "z", "delta_bias"), True),
        ("grouped", ("D", "z", "delta_bias"), True),
        ("fixed", ("D",), False),
        ("grouped", ("z",), False),
    ],
)
def test_selective_scan_onnx_is_one_scan(bc, optional, delta_softplus, tmp_path):
    """Exports at L = 1, 6 and 17 have the same nodes (one Scan, no unrolling) and match the reference."""
    spec = OPS["selective_scan"]
    if all(spec.built(b) is not None for b, kernel in spec.kernels.items() if kernel.onnx is not None):
        pytest.skip("no selective_scan backend with the Scan translation is built (it exports unrolled)")
    names = ["u", "delta", "A", "B", "C", *optional]
    graphs = []
    for length in (1, 6, 17):
        inputs = _scan_inputs(length, bc, seed=length)
        tensors = [inputs[n] for n in names]
        path = export_onnx(_Scan(names, delta_softplus), tensors, tmp_path / f"scan{length}.onnx")
        op_types, model = check_standard(path)
        assert "Scan" in op_types and "Loop" not in op_types, op_types
        graphs.append([n.op_type for n in model.graph.node])
        expected = _scan_reference({n: inputs[n] for n in names}, delta_softplus)
        assert_matches(run_onnxruntime(path, tensors), expected, *ONNX_TOLERANCE["selective_scan"])
    assert graphs[0] == graphs[1] == graphs[2]


def test_selective_scan_onnx_dynamic_length(tmp_path):
    """One export with a dynamic L runs at other lengths, L = 1 included."""
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    length = torch.export.Dim("L", min=2, max=4096)
    per_name = {"u": {2: length}, "delta": {2: length}, "B": {3: length}, "C": {3: length}, "z": {2: length}}
    dynamic_shapes = tuple(per_name.get(n) for n in names)  # one entry: forward takes *tensors
    inputs = _scan_inputs(7, "grouped", seed=3)
    tensors = [inputs[n] for n in names]
    path = export_onnx(_Scan(names, True), tensors, tmp_path / "scan.onnx", dynamic_shapes=(dynamic_shapes,))
    check_standard(path)
    for run_length in (1, 2, 7, 40):
        inputs = _scan_inputs(run_length, "grouped", seed=run_length + 10)
        outputs = run_onnxruntime(path, [inputs[n] for n in names])
        assert_matches(outputs, _scan_reference(inputs, True), *ONNX_TOLERANCE["selective_scan"])


def test_selective_scan_onnx_half_inputs(tmp_path):
    """float16 u, delta, B, C, z: the scan runs in float32 and the output is rounded to float16 once."""
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    inputs = _scan_inputs(9, "grouped", seed=21)
    for n in ("u", "delta", "B", "C", "z"):
        inputs[n] = inputs[n].half()
    tensors = [inputs[n] for n in names]
    path = export_onnx(_Scan(names, True), tensors, tmp_path / "scan16.onnx")
    check_standard(path)
    out, last = run_onnxruntime(path, tensors)
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    expected = _scan_reference(inputs, True)
    torch.testing.assert_close(out.double(), expected[0], atol=8e-3, rtol=8e-3)  # float16's harness x4
    torch.testing.assert_close(last.double(), expected[1], atol=4e-5, rtol=4e-5)


# --- masked_gather: the reference lowering, static or data-dependent slot count ---------------------------


class _Gather(torch.nn.Module):
    def __init__(self, max_count: int | None):
        super().__init__()
        self.max_count = max_count

    def forward(self, x, mask):
        return tuple(fastvision.ops.masked_gather(x, mask, self.max_count))


@pytest.mark.parametrize("max_count", [6, None])
def test_masked_gather_onnx_on_other_masks(max_count, tmp_path):
    """The graph is not specialized to the example mask: other masks (fewer sites, more than
    max_count, none) give the reference's values, indices, valid and counts; with max_count=None the
    slot count follows the data."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 6, generator=generator)
    example = torch.rand(3, 5, 6, generator=generator) < 0.3
    path = export_onnx(_Gather(max_count), [x, example], tmp_path / "gather.onnx")
    check_standard(path)
    for ratio in (0.1, 0.5, 0.9, 0.0):
        x = torch.randn(3, 4, 5, 6, generator=generator)
        mask = torch.rand(3, 5, 6, generator=generator) < ratio
        expected = list(fastvision.ops.masked_gather_reference(x.double(), mask, max_count))
        assert_matches(run_onnxruntime(path, [x, mask]), expected, 0.0, 0.0)
