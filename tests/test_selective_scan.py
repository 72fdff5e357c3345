"""selective_scan: what the shared harness does not cover — long sequences, the last state alone,
agreement with mamba-ssm's kernel when installed, and errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICE, assert_close, backend_params

import fastvision
from fastvision._backend import PEER_BACKENDS, mamba_ssm_missing, why_unusable
from fastvision.ops import OPS, selective_scan, selective_scan_reference

# The package's backends (peer backends such as mamba_ssm take a subset of the flags: tested below).
BACKENDS = backend_params(b for b in OPS["selective_scan"].backends if b not in PEER_BACKENDS)


def _inputs(batch=2, dim=8, length=40, state=16, seed=0, dtype=torch.float32, varying=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    u, delta, z = r(batch, dim, length), r(batch, dim, length, scale=0.5), r(batch, dim, length)
    u, delta = u.to(dtype), delta.to(dtype)
    A = -torch.rand(dim, state, generator=g).to(DEVICE) - 0.05
    bc = (batch, state, length) if varying else (dim, state)
    return u, delta, A, r(*bc).to(dtype), r(*bc).to(dtype), r(dim), z.to(dtype), r(dim, scale=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_with_gradients(backend):
    """L = 300 with decays near 1: errors would accumulate along the carried state."""
    u, delta, A, B, C, D, z, bias = _inputs(length=300, seed=1)
    A = A * 0.01
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, B, C)]
    with fastvision.use_backend(backend):
        out, last = selective_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], D, z, bias, True, True)
    ref_leaves = [t.double().requires_grad_(True) for t in (u, delta, B, C)]
    want, want_last = selective_scan_reference(*ref_leaves[:2], A.double(), *ref_leaves[2:], D.double(),
                                               z.double(), bias.double(), True, True)  # fmt: skip
    assert_close(out, want, torch.float32, scale=20)
    assert_close(last, want_last, torch.float32, scale=20)
    grads = torch.autograd.grad((out * z).sum() + last.sum(), leaves)
    want_grads = torch.autograd.grad((want * z.double()).sum() + want_last.sum(), ref_leaves)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected, torch.float32, scale=200)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_the_last_state_alone(backend):
    u, delta, A, B, C, *_ = _inputs(seed=2, varying=False)
    u.requires_grad_(True)
    with fastvision.use_backend(backend):
        _, last = selective_scan(u, delta, A, B, C, return_last_state=True)
        (grad,) = torch.autograd.grad(last.sum(), u)
    u64 = u.detach().double().requires_grad_(True)
    doubles = (t.double() for t in (delta, A, B, C))
    _, want = selective_scan_reference(u64, *doubles, return_last_state=True)
    (want_grad,) = torch.autograd.grad(want.sum(), u64)
    assert_close(grad, want_grad, torch.float32, scale=10)


@pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is None or DEVICE.type != "cuda",
    reason="mamba-ssm's CUDA selective scan is an optional peer (the 'mamba' extra on a CUDA machine)",
)
def test_agrees_with_mamba_ssm():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=16, length=128, seed=3)
    want = selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert_close(selective_scan(u, delta, A, B, C, D, z, bias, True), want.double(), torch.float32, scale=20)


def _bad(**changes):
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=4, length=5, state=3)
    args = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": bias}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"A": torch.complex(-torch.rand(4, 3), torch.rand(4, 3))}, TypeError, "A must be real"),
        ({"A": -torch.rand(4, 257)}, ValueError, r"N \(A.shape\[1\]\) must be in \[1, 256\]"),
        ({"A": -torch.rand(4, 3, dtype=torch.float64)}, TypeError, "A must be float32"),
        ({"delta": torch.rand(2, 4, 6)}, ValueError, "delta must have u's shape"),
        ({"B": torch.randn(2, 3, 3, 5)}, ValueError, "groups G = 3 must divide dim = 4"),
        ({"C": torch.randn(2, 3, 4)}, ValueError, r"C varying must have shape \[batch, N, L\]"),
        ({"D": torch.randn(4, dtype=torch.float16)}, TypeError, "D must be float32"),
        ({"delta_bias": torch.randn(5)}, ValueError, r"delta_bias must have shape \[dim\]"),
        ({"z": torch.randn(2, 4)}, ValueError, "z must have u's shape"),
        ({"u": torch.ones(2, 4, 5, dtype=torch.int64)}, TypeError, "u must have dtype"),
        ({"delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
    ],
)
def test_rejects_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        selective_scan(**_bad(**changes))


# --- B and C with different group counts, positive A (issue reproducers) ---------------------------------


def _double_grads(fn, tensors, differentiable):
    """``fn(*tensors)`` and the gradients of a fixed random projection of its outputs by the tensors at
    ``differentiable``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(i in differentiable)
              for i, t in enumerate(tensors)]  # fmt: skip
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)  # fmt: skip
    grads = torch.autograd.grad(loss, [leaves[i] for i in differentiable])
    return outputs, grads


def _against_reference(backend, tensors, differentiable, flags, scale=10.0, **kwargs):
    def run(*ts):
        with fastvision.use_backend(backend):
            return selective_scan(*ts, *flags, **kwargs)

    def reference(*ts):
        return selective_scan_reference(*ts, *flags, **kwargs)

    got, grads = _double_grads(run, tensors, differentiable)
    wide = [t.double() if t is not None and t.dtype == torch.float32 else t for t in tensors]
    # A, D and delta_bias are float32 by contract: the float64 reference takes them in float64.
    want, want_grads = _double_grads(reference, wide, differentiable)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float32, scale=scale)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, torch.float32, scale=scale * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_b_and_c_with_different_groups(backend):
    """B in 2 groups with C in 1 (varying), and the reverse pairing with fixed B: each tensor is read
    with its own grouping (an out-of-bounds read gave NaNs; the cpu backend refused it)."""
    g = torch.Generator().manual_seed(11)
    u, delta = torch.randn(2, 4, 9, generator=g), torch.rand(2, 4, 9, generator=g) / 2
    A = -torch.rand(4, 5, generator=g)
    B2, C1 = torch.randn(2, 2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    tensors = [t.to(DEVICE) for t in (u, delta, A, B2, C1)]
    _against_reference(backend, tensors, (0, 1, 2, 3, 4), (None, None, None, False, True))
    fixed_b, c4 = torch.randn(4, 5, generator=g), torch.randn(2, 4, 5, 9, generator=g)
    tensors = [t.to(DEVICE) for t in (u, delta, A, fixed_b, c4)]
    _against_reference(backend, tensors, (0, 1, 2, 3, 4), (None, None, None, False, True))
    # 6 channels in 2 groups of B (3 each) and 3 groups of C (2 each): groups that do not nest.
    u6, d6 = torch.randn(1, 6, 5, generator=g), torch.rand(1, 6, 5, generator=g)
    A6 = -torch.rand(6, 3, generator=g)
    B6, C6 = torch.randn(1, 2, 3, 5, generator=g), torch.randn(1, 3, 3, 5, generator=g)
    tensors = [t.to(DEVICE) for t in (u6, d6, A6, B6, C6)]
    _against_reference(backend, tensors, (0, 1, 2, 3, 4), (None, None, None, False, True), reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_a_growing_states(backend):
    """A > 0 makes the decays grow: products of decays across a chunk overflow long before the states
    do, and the kernels never multiply such a product by a zero state (NaN where the reference is finite)."""
    g = torch.Generator().manual_seed(12)
    u = torch.randn(1, 3, 6, generator=g) * 1e-3
    delta = torch.full((1, 3, 6), 3.0)
    A = torch.full((3, 4), 15.0)  # decay exp(45) = 3.5e19 per step: the product of two overflows
    B, C = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    tensors = [t.to(DEVICE) for t in (u, delta, A, B, C)]
    with fastvision.use_backend(backend):
        out = selective_scan(*tensors)
    want = selective_scan_reference(*(t.double() for t in tensors))
    assert torch.isfinite(want[..., :2]).all() and want[..., 1].abs().max() > 1e12
    assert_close(out[..., :2], want[..., :2], torch.float32, scale=10)
    representable = want.abs() < 1e30  # later steps leave float32's range in every backend
    assert representable.sum() >= 2 * 3
    assert_close(out[representable], want[representable], torch.float32, scale=10)


# --- reverse ---------------------------------------------------------------------------------------------


def _flip_time(t, varying_dims=3):
    return t.flip(-1) if t is not None and t.dim() >= varying_dims else t


REVERSE_CASES = {
    "varying-full": ("varying", True),
    "fixed-bare": ("fixed", False),
    "grouped-full": ("grouped", True),
}


@pytest.mark.parametrize("case", list(REVERSE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_is_the_flipped_scan(backend, case):
    """reverse=True equals flipping u, delta, z and varying B/C along L, scanning, and flipping the output
    back (forward and backward, in float64 through the reference); its last state is the state after
    step 0. L = 67 crosses a chunk boundary of every backend's tiling (chunks of 16 to 64)."""
    bc, full = REVERSE_CASES[case]
    varying = bc != "fixed"
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=5, length=67, state=6, seed=13, varying=varying)
    if bc == "grouped":
        g = torch.Generator().manual_seed(14)
        B = torch.randn(2, 5, 6, 67, generator=g).to(DEVICE)
        C = torch.randn(2, 1, 6, 67, generator=g).to(DEVICE)
    optional = (D, z, bias) if full else (None, None, None)
    tensors = [u, delta, A, B, C, *optional]
    differentiable = tuple(i for i, t in enumerate(tensors) if t is not None)
    flags = (full, True)

    def run(*ts):
        with fastvision.use_backend(backend):
            return selective_scan(*ts, *flags, reverse=True)

    def flipped(*ts):
        u, delta, A, B, C, D, z, bias = ts
        out, last = selective_scan_reference(
            _flip_time(u), _flip_time(delta), A, _flip_time(B), _flip_time(C), D, _flip_time(z), bias, *flags
        )
        return out.flip(-1), last

    got, grads = _double_grads(run, tensors, differentiable)
    wide = [None if t is None else t.double() for t in tensors]
    want, want_grads = _double_grads(flipped, wide, differentiable)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32, scale=20)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, torch.float32, scale=200)
    # The reference's own reverse loop is the same definition.
    ref = selective_scan_reference(*wide, *flags, reverse=True)
    torch.testing.assert_close(ref[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref[1], want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_of_one_and_two_steps(backend):
    for length in (1, 2):
        u, delta, A, B, C, D, z, bias = _inputs(batch=1, dim=3, length=length, state=2, seed=15)
        _against_reference(backend, [u, delta, A, B, C, D, z, bias], (0, 1, 3, 4), (True, True), reverse=True)


# --- the registered kernel ops check what keeps them in bounds ---------------------------------------


def _kernel_args(**changes):
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=4, length=5, state=3)
    args = {"u": u, "delta": delta, "A": A, "B": B.unsqueeze(1), "C": C.unsqueeze(1), "D": D, "z": z,
            "delta_bias": bias}  # fmt: skip
    args.update(changes)
    return list(args.values())


BAD_KERNEL_ARGS = {
    "B groups do not divide dim": {"B": torch.randn(2, 3, 3, 5)},
    "C too short in L": {"C": torch.randn(2, 1, 3, 4)},
    "A too narrow for B": {"A": -torch.rand(4, 2)},
    "D too short": {"D": torch.randn(3)},
    "delta_bias float16": {"delta_bias": torch.randn(4, dtype=torch.float16)},
    "B three dims": {"B": torch.randn(2, 3, 5)},
    "z wrong shape": {"z": torch.randn(2, 4, 4)},
    "u integer": {"u": torch.ones(2, 4, 5, dtype=torch.int32)},
}


def _kernel_ops():
    spec = OPS["selective_scan"]
    for backend, kernel in spec.kernels.items():
        if backend in PEER_BACKENDS:
            continue
        if spec.built(backend) is None and (backend != "triton" or DEVICE.type == "cuda" or _interpreting()):
            yield backend, kernel


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("bad", list(BAD_KERNEL_ARGS))
def test_kernel_ops_refuse_out_of_bounds_arguments(bad):
    ops = list(_kernel_ops())
    if not ops:
        pytest.skip("no selective_scan kernel op is built or runnable here")
    args = _kernel_args(**{k: v.to(DEVICE) for k, v in BAD_KERNEL_ARGS[bad].items()})
    for _, kernel in ops:
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            kernel.forward_op()(*args, True, False)
        u = _kernel_args()[0]
        grads = (torch.randn_like(u), torch.randn(2, 4, 3, device=DEVICE))
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            kernel.backward_op()(*grads, *args, True, False)


def test_kernel_backward_ops_refuse_wrong_gradients():
    ops = list(_kernel_ops())
    if not ops:
        pytest.skip("no selective_scan kernel op is built or runnable here")
    args = _kernel_args()
    u = args[0]
    for _, kernel in ops:
        for grads in ((torch.randn(2, 4, 4, device=DEVICE), torch.randn(2, 4, 3, device=DEVICE)),
                      (torch.randn_like(u), torch.randn(2, 4, 2, device=DEVICE)),
                      (torch.randn_like(u), torch.randn(2, 3, 3, device=DEVICE))):  # fmt: skip
            with pytest.raises((RuntimeError, ValueError)):
                kernel.backward_op()(*grads, *args, True, False)
        kernel.backward_op()(torch.randn_like(u), torch.randn(2, 4, 3, device=DEVICE), *args, True, False)


# --- determinism -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bit_identical_run_to_run(backend):
    """Grouped B and C sum their gradients over channels: in a fixed order, so two runs agree bit for bit."""
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=8, length=70, state=4, seed=16)
    g = torch.Generator().manual_seed(17)
    B = torch.randn(2, 2, 4, 70, generator=g).to(DEVICE)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C)]
        with fastvision.use_backend(backend):
            out = selective_scan(*leaves, D, z, bias, True, reverse=False)
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


# --- lengths around the Triton chunk, a channel count off the tile ---------------------------------------


def _chunk_lengths():
    """1, 2 and the Triton chunk of float32 inputs (on this machine: the interpreter's or a GPU's) +- 1."""
    try:
        from fastvision.triton_kernels._launch import interpreting
        from fastvision.triton_kernels.selective_scan import scan_tile

        chunk = scan_tile(4, interpret=interpreting()).block_l
    except ImportError:  # no triton: the other backends have no chunk, any lengths do
        chunk = 16
    return sorted({1, 2, chunk - 1, chunk, chunk + 1})


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("varying", [True, False], ids=["varying", "fixed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_around_the_chunk(backend, varying, reverse):
    """L = 1, 2, chunk - 1, chunk, chunk + 1 with 3 channels (no multiple of any channel tile), every
    optional input and softplus, forward and backward against the float64 reference."""
    for length in _chunk_lengths():
        u, delta, A, B, C, D, z, bias = _inputs(batch=1, dim=3, length=length, state=3, seed=length,
                                                varying=varying)  # fmt: skip
        tensors = [u, delta, A, B, C, D, z, bias]
        _against_reference(backend, tensors, tuple(range(8)), (True, True), reverse=reverse)


# --- the CUDA kernel's chunks (2048 steps) and state sizes -------------------------------------------------

CUDA_ONLY = pytest.mark.skipif(
    why_unusable("cuda", DEVICE) is not None or OPS["selective_scan"].built("cuda") is not None,
    reason=f"cuda: {why_unusable('cuda', DEVICE) or OPS['selective_scan'].built('cuda')}",
)


@CUDA_ONLY
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("length", [2047, 2048, 2049, 4097])
def test_cuda_lengths_around_its_chunk(length, reverse):
    """The CUDA kernels carry the state across 2048-step chunks (forward) and recompute each chunk from
    its entering state (backward): lengths around one and two chunks, grouped B with fixed C."""
    u, delta, A, B, C, D, z, bias = _inputs(batch=1, dim=4, length=length, state=5, seed=length)
    A = A * 0.05  # slow decays: the carried state matters across the chunk boundary
    g = torch.Generator().manual_seed(length + 1)
    B = torch.randn(1, 2, 5, length, generator=g).to(DEVICE)
    C = torch.randn(4, 5, generator=g).to(DEVICE)
    tensors = [u, delta, A, B, C, D, z, bias]
    _against_reference("cuda", tensors, tuple(range(8)), (True, True), scale=20, reverse=reverse)


# Triton's interpreter takes about 20 s for N = 256: once, in float16.
STATE_SIZE_CASES = [
    pytest.param(backend, state, dtype, id=f"{backend}-{state}-{str(dtype).removeprefix('torch.')}")
    for backend in ("triton", "cuda")
    for state in (1, 33, 256)
    for dtype in (torch.float16, torch.bfloat16)
    if not (backend == "triton" and state == 256 and dtype == torch.bfloat16)
]


@pytest.mark.parametrize(("backend", "state", "dtype"), STATE_SIZE_CASES)
def test_state_sizes_and_half_inputs(backend, state, dtype):
    """N from 1 to 256 (every backward gradient tile, 16 to 256 states) with half-precision u, delta, z
    and varying B/C (float32 state). Triton runs two chunks of a partial channel block (its interpreter
    pays per state step)."""
    why = why_unusable(backend, DEVICE) or OPS["selective_scan"].built(backend)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    batch, length = (1, 20) if backend == "triton" and _interpreting() else (2, 130)
    u, delta, A, B, C, D, z, bias = _inputs(batch=batch, dim=3, length=length, state=state, seed=state,
                                            dtype=dtype)  # fmt: skip
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C)]
    with fastvision.use_backend(backend):
        out, last = selective_scan(*leaves, D, z, bias, True, True)
    assert out.dtype == dtype and last.dtype == torch.float32
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    want, want_last = selective_scan_reference(*wide, D.double(), z.double(), bias.double(), True, True)
    assert_close(out, want, dtype, scale=4)
    assert_close(last, want_last, torch.float32, scale=50)
    grads = torch.autograd.grad(out.float().sum() + last.sum(), leaves)
    want_grads = torch.autograd.grad(want.sum() + want_last.sum(), wide)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected, dtype, scale=20)


# --- mamba-ssm as a backend ------------------------------------------------------------------------------

MAMBA_MISSING = why_unusable("mamba_ssm", DEVICE)


def test_mamba_ssm_is_never_chosen_automatically():
    spec = OPS["selective_scan"]
    assert "mamba_ssm" in spec.backends
    assert "mamba_ssm" not in spec.gpu_order and "mamba_ssm" not in spec.cpu_order


@pytest.mark.skipif(mamba_ssm_missing() is None, reason="mamba-ssm imports here: no missing-library error")
def test_mamba_ssm_backend_without_mamba_ssm_says_why():
    u, delta, A, B, C, *_ = _inputs(batch=1, dim=2, length=4, state=3)
    missing = fastvision.BackendUnavailableError
    with fastvision.use_backend("mamba_ssm"), pytest.raises(missing, match="'mamba_ssm'.*mamba-ssm is"):
        selective_scan(u, delta, A, B, C)
    spec = OPS["selective_scan"]
    with pytest.raises(fastvision.BackendUnavailableError, match="mamba-ssm"):
        spec.kernels["mamba_ssm"].call(spec.kernels["mamba_ssm"].forward_op(), *spec.check(u, delta, A, B, C))


@pytest.mark.skipif(MAMBA_MISSING is not None, reason=f"mamba_ssm: {MAMBA_MISSING}")
@pytest.mark.parametrize("varying", [True, False], ids=["varying", "fixed"])
def test_mamba_ssm_backend_matches_the_reference(varying):
    tensors = list(_inputs(batch=2, dim=6, length=300, state=16, seed=18, varying=varying))
    _against_reference("mamba_ssm", tensors, tuple(range(8)), (True, False), scale=20)
    with fastvision.use_backend("mamba_ssm"), torch.no_grad():  # the last state without gradients
        out, last = selective_scan(*tensors, True, True)
    want, want_last = selective_scan_reference(*(t.double() for t in tensors), True, True)
    assert_close(out, want, torch.float32, scale=20)
    assert_close(last, want_last, torch.float32, scale=20)


@pytest.mark.skipif(MAMBA_MISSING is not None, reason=f"mamba_ssm: {MAMBA_MISSING}")
def test_mamba_ssm_backend_refuses_what_it_cannot_take():
    u, delta, A, B, C, D, z, bias = _inputs(batch=1, dim=4, length=8, state=3)
    with fastvision.use_backend("mamba_ssm"):
        with pytest.raises(fastvision.BackendUnavailableError, match="reverse"):
            selective_scan(u, delta, A, B, C, reverse=True)
        with pytest.raises(fastvision.BackendUnavailableError, match="last state"):
            selective_scan(u.requires_grad_(True), delta, A, B, C, return_last_state=True)
        with pytest.raises(fastvision.BackendUnavailableError, match="dtype"):
            selective_scan(u.detach().half(), delta, A, B.half(), C.half())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "triton"])
def test_triton_backward_reuses_the_forward_chunk_states(backend, monkeypatch):
    """The forward's chunk states reach the backward: no second states pass, and the same bits as the
    backward op that recomputes them."""
    from fastvision.triton_kernels import selective_scan as kernels

    passes = []
    states_pass = kernels._scan_states
    monkeypatch.setattr(kernels, "_scan_states", lambda *a, **k: passes.append(1) or states_pass(*a, **k))
    u, delta, A, B, C, D, z, bias = _inputs(batch=2, dim=3, length=37, state=5, seed=21)
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C)]
    with fastvision.use_backend(backend):
        out, last = selective_scan(*leaves, D, z, bias, True, True, reverse=True)
        assert len(passes) == 1
        grad_out, grad_last = torch.randn_like(out), torch.randn_like(last)
        grads = torch.autograd.grad((out, last), leaves, (grad_out, grad_last))
    assert len(passes) == 1
    recomputed = OPS["selective_scan"].kernels["triton"].backward_op()(
        grad_out, grad_last, u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, bias, True, True
    )
    assert len(passes) == 2
    for got, want in zip(grads, recomputed[:5], strict=True):
        assert torch.equal(got, want.view_as(got))
