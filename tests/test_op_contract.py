"""The shared harness: every op in ``fastvision.ops.OPS``, every backend, against its reference.

For each op, backend, dtype and sample (odd, non-contiguous and empty inputs, tests/op_samples.py):
forward and backward against the float64 reference; a backend whose declared limits refuse the
input raises BackendUnavailableError when forced. For each kernel backend: ``torch.library.opcheck``
of its forward and backward ops; ``torch.compile(fullgraph=True)`` and ``torch.export`` against
eager; higher-order gradients against the reference; forward-mode AD through the reference, and a
clear error when a kernel backend is forced under it. Per-op test files hold only what is specific
to their op.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, REQUIRED_BACKENDS, TOLERANCES, assert_close, stable_seed
from op_samples import SAMPLES, Sample, random
from torch.utils._python_dispatch import TorchDispatchMode

import fastvision
from fastvision import BackendUnavailableError
from fastvision._backend import why_unusable
from fastvision.ops import OPS

# opcheck utilities skipped for an op, and why.
OPCHECK_SKIPS = {
    # opcheck's AOT utilities add every output into one accumulator, which fails when the first output
    # is an integer (out_coords) and a later one float; test_compile_matches_eager covers AOT dispatch.
    "sparse_max_pool2d_forward": ("test_aot_dispatch_dynamic",),
    # Its higher-order rule loops over the kernel offsets read on the host: double backward through
    # it runs eagerly, not traced (first-order compile and export are checked below).
    "sparse_conv2d_gather_gemm_backward": ("test_aot_dispatch_dynamic",),
}


def _dtypes(spec):
    return [d for d in spec.dtypes if d in TOLERANCES]


def _backend_marks(spec, backend):
    reason = why_unusable(backend, DEVICE) or spec.built(backend)
    if reason is not None and backend not in REQUIRED_BACKENDS:
        return [pytest.mark.skip(reason=f"{backend}: {reason}")]
    return []


def _params(kernels_only=False):
    params = []
    for name, spec in OPS.items():
        for backend in spec.backends:
            if kernels_only and backend not in spec.kernels:
                continue
            marks = _backend_marks(spec, backend)
            params.append(pytest.param(name, backend, id=f"{name}-{backend}", marks=marks))
    return params


def _sample_params():
    params = []
    for name, spec in OPS.items():
        for backend in spec.backends:
            marks = _backend_marks(spec, backend)
            for dtype in _dtypes(spec):
                for sample in SAMPLES[name](dtype):
                    label = f"{name}-{backend}-{str(dtype).removeprefix('torch.')}-{sample.label}"
                    params.append(pytest.param(name, backend, dtype, sample.label, id=label, marks=marks))
    return params


def _sample(name: str, dtype: torch.dtype, label: str) -> Sample:
    return next(s for s in SAMPLES[name](dtype) if s.label == label)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _with_leaves(args, positions, dtype=None):
    """``args`` with fresh leaves (optionally cast) at ``positions``; other floating tensors cast too."""
    out = list(args)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach() if dtype is None else a.detach().to(dtype)
            out[i] = t.requires_grad_(True) if i in positions else t
    return out


def _grad_outputs(outputs, seed):
    floating = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    return floating, [random(o.shape, o.dtype, seed + i) for i, o in enumerate(floating)]


def _grads(outputs, leaves, grad_outputs, **kwargs):
    if not outputs:
        return [torch.zeros_like(t) for t in leaves]
    found = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, leaves, strict=True)]


def test_every_op_has_samples():
    assert set(OPS) == set(SAMPLES), "declare samples for every op in tests/op_samples.py"


def test_every_op_is_complete():
    for name, spec in OPS.items():
        assert getattr(fastvision.ops, name) is not None and callable(spec.reference), name
        assert f"{name}_reference" in dir(fastvision.ops), name
        for order in (spec.gpu_order, spec.cpu_order):
            assert set(order) <= set(spec.kernels), name
        for backend, kernel in spec.kernels.items():
            assert kernel.autograd.backward_reference is not None, (name, backend)


@pytest.mark.parametrize("name, backend, dtype, label", _sample_params())
def test_matches_reference(name, backend, dtype, label):
    spec, sample = OPS[name], _sample(name, dtype, label)
    op = getattr(fastvision.ops, name)
    checked = spec.check(*sample.args)
    limit = spec.why_not(backend, checked, DEVICE, None)
    if limit is not None:
        with fastvision.use_backend(backend), pytest.raises(BackendUnavailableError, match=backend):
            op(*sample.args)
        return
    before = [t.clone() for t in _tensors(sample.args)]

    ref_args = _with_leaves(checked, sample.grad, torch.float64)
    expected = _tensors(spec.reference(*ref_args))
    args = _with_leaves(sample.args, sample.grad)
    with fastvision.use_backend(backend):
        outputs = _tensors(op(*args))
    assert len(outputs) == len(expected)
    with torch.no_grad():  # the dtypes the definition gives at the sample's own dtype
        dtypes = [o.dtype for o in _tensors(spec.reference(*checked))]
    for out, want, out_dtype in zip(outputs, expected, dtypes, strict=True):
        assert out.shape == want.shape
        if want.is_floating_point():
            assert out.dtype == out_dtype
            assert_close(out, want, dtype, scale=sample.scale)
        else:
            assert torch.equal(out.cpu(), want.cpu())

    seed = stable_seed(name, label)
    floating, grad_outputs = _grad_outputs(outputs, seed)
    leaves = [args[i] for i in sample.grad]
    grads = _grads(floating, leaves, grad_outputs)
    ref_floating = [o for o in expected if o.is_floating_point() and o.requires_grad]
    ref_leaves = [ref_args[i] for i in sample.grad]
    expected_grads = _grads(ref_floating, ref_leaves, [g.double() for g in grad_outputs])
    for leaf, grad, want in zip(leaves, grads, expected_grads, strict=True):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype
        assert_close(grad, want, dtype, scale=sample.grad_scale)
    for old, new in zip(before, _tensors(sample.args), strict=True):
        assert torch.equal(old, new), "inputs must not be written"


class _CaptureOps(TorchDispatchMode):
    """Records every ``fastvision::`` op call with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastvision":
            self.calls.setdefault(func, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _first_sample(name):
    return SAMPLES[name](torch.float32)[0]


def _run_kernel_pair(name, backend):
    """Run the backend on its first float32 sample; returns the captured forward and backward calls."""
    spec, sample = OPS[name], _first_sample(name)
    kernel = spec.kernels[backend]
    args = _with_leaves(sample.args, sample.grad)
    capture = _CaptureOps()
    with fastvision.use_backend(backend), capture:
        outputs = _tensors(getattr(fastvision.ops, name)(*args))
        floating, grad_outputs = _grad_outputs(outputs, 7)
        _grads(floating, [args[i] for i in sample.grad], grad_outputs)
    return capture.calls[kernel.forward_op()], capture.calls[kernel.backward_op()]


@pytest.mark.parametrize("name, backend", _params(kernels_only=True))
def test_opcheck(name, backend):
    kernel = OPS[name].kernels[backend]
    (forward_args, forward_kwargs), (backward_args, backward_kwargs) = _run_kernel_pair(name, backend)
    forward_args = [
        a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in forward_args
    ]
    for op, args, kwargs, op_name in (
        (kernel.forward_op(), forward_args, forward_kwargs, kernel.forward),
        (kernel.backward_op(), backward_args, backward_kwargs, kernel.backward),
    ):
        skipped = OPCHECK_SKIPS.get(op_name, ())
        utils = [u for u in torch.library._OPCHECK_DEFAULT_UTILS if u not in skipped]
        torch.library.opcheck(op, tuple(args), kwargs, test_utils=utils)


class _Call(torch.nn.Module):
    """The op with its non-differentiable arguments fixed; the differentiable ones are inputs."""

    def __init__(self, name, sample):
        super().__init__()
        self.name, self.sample = name, sample

    def forward(self, *inputs):
        args = list(self.sample.args)
        for i, value in zip(self.sample.grad, inputs, strict=True):
            args[i] = value
        return tuple(_tensors(getattr(fastvision.ops, self.name)(*args)))


def _traceable(name, backend):
    return backend != "reference" or OPS[name].reference_traceable


@pytest.mark.parametrize("name, backend", _params())
def test_compile_matches_eager(name, backend):
    if not _traceable(name, backend):
        pytest.skip("the reference cannot be traced; the op's own tests check its clear error")
    torch._dynamo.reset()  # one compiled module class for every op: start each from a clean cache
    sample = _first_sample(name)
    module = _Call(name, sample)
    inputs = [sample.args[i].detach().clone().requires_grad_(True) for i in sample.grad]
    eager_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    with fastvision.use_backend(backend):
        expected = module(*eager_inputs)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        outputs = compiled(*inputs)
        floating, grad_outputs = _grad_outputs(list(outputs), 11)
        grads = _grads(floating, inputs, grad_outputs)
        expected_floating, _ = _grad_outputs(list(expected), 11)
        expected_grads = _grads(expected_floating, eager_inputs, grad_outputs)
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("name, backend", _params())
def test_export_matches_eager(name, backend):
    if not _traceable(name, backend):
        pytest.skip("the reference cannot be traced; the op's own tests check its clear error")
    sample = _first_sample(name)
    module = _Call(name, sample).eval()
    inputs = tuple(sample.args[i] for i in sample.grad)
    with fastvision.use_backend(backend):
        exported = torch.export.export(module, inputs)
        expected = module(*inputs)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    if backend in OPS[name].kernels:
        forward = OPS[name].kernels[backend].forward
        assert any(forward in t for t in targets), targets
    for out, want in zip(exported.module()(*inputs), expected, strict=True):
        torch.testing.assert_close(out, want)


def _second_order(name, backend, dtype):
    """Gradients of ``sum(grad . v)`` (grad = the VJP with a ``u`` that requires grad) with respect to
    the inputs and ``u``: Hessian-vector products and the derivative of the backward in its cotangent."""
    spec, sample = OPS[name], _first_sample(name)
    if backend == "reference":
        args = _with_leaves(spec.check(*sample.args), sample.grad, dtype)
        run = spec.reference
    else:
        args = _with_leaves(sample.args, sample.grad, dtype)
        run = getattr(fastvision.ops, name)
    with fastvision.use_backend(None if backend == "reference" else backend):
        outputs = [o for o in _tensors(run(*args)) if o.is_floating_point() and o.requires_grad]
        leaves = [args[i] for i in sample.grad]
        cotangents = [random(o.shape, dtype, 21 + i).requires_grad_(True) for i, o in enumerate(outputs)]
        grads = torch.autograd.grad(outputs, leaves, cotangents, create_graph=True, allow_unused=True)
        directions = [random(t.shape, dtype, 31 + i) for i, t in enumerate(leaves)]
        total = sum((g * d).sum() for g, d in zip(grads, directions, strict=True) if g is not None)
        return _grads([total], leaves + cotangents, None)


@pytest.mark.parametrize("name, backend", _params(kernels_only=True))
def test_higher_order_gradients(name, backend):
    """Double backward through a kernel backend equals the reference's: never silent zeros."""
    got = _second_order(name, backend, torch.float32)
    want = _second_order(name, "reference", torch.float64)
    assert any(w.abs().max() > 0 for w in want if w.numel()), "the sample must have second-order terms"
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32, scale=20.0)


@pytest.mark.parametrize("name, backend", _params())
def test_forward_mode_ad(name, backend):
    """jvp runs the reference (correct tangents); a forced kernel backend refuses it by name."""
    spec, sample = OPS[name], _first_sample(name)
    op = getattr(fastvision.ops, name)
    primals = [sample.args[i].detach() for i in sample.grad]
    tangents = [random(p.shape, p.dtype, 41 + i) for i, p in enumerate(primals)]

    def fn(*inputs):
        args = list(sample.args)
        for i, value in zip(sample.grad, inputs, strict=True):
            args[i] = value
        return tuple(o for o in _tensors(op(*args)) if o.is_floating_point())

    if backend != "reference":
        with fastvision.use_backend(backend), pytest.raises(BackendUnavailableError, match="torch.func"):
            torch.func.jvp(fn, tuple(primals), tuple(tangents))
        import torch.autograd.forward_ad as fwad

        with fastvision.use_backend(backend), fwad.dual_level():
            duals = [fwad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            with pytest.raises(BackendUnavailableError, match="forward-mode AD"):
                fn(*duals)
        return
    _, tangent_out = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    # The same directional derivative by autograd (reverse mode twice is not needed: compare with
    # a finite-free check, the VJP identity <J t, u> == <t, J^T u>).
    leaves = [p.clone().requires_grad_(True) for p in primals]
    outputs = fn(*leaves)
    cotangents = [random(o.shape, o.dtype, 51 + i) for i, o in enumerate(outputs)]
    vjp = _grads(list(outputs), leaves, cotangents)
    left = sum((j.double() * u.double()).sum() for j, u in zip(tangent_out, cotangents, strict=True))
    right = sum((t.double() * g.double()).sum() for t, g in zip(tangents, vjp, strict=True))
    torch.testing.assert_close(left, right, atol=1e-3, rtol=1e-4)
    assert spec.reference is not None
