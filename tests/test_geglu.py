"""geglu: every backend against the float64 reference, forward and backward; registration; errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, backend_params, stable_seed

import fastvision
from fastvision.nn import GEGLU, FeedForward
from fastvision.ops import OPS
from fastvision.ops.geglu import geglu, geglu_backward_reference, geglu_reference

BACKENDS = backend_params(OPS["geglu"].backends)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (7, 2),  # H = 1
    (5, 3, 26),  # H = 13, three dims
    (1, 254),  # H = 127
    (33, 130),  # H = 65, more rows than one tile
    (4, 2 * 1000 + 2),  # H = 1001, several column tiles
    (6, 16),  # H = 8: the CUDA kernel's 16-byte vectors for half types
    (3, 7, 128),  # H = 64
    (2, 2 * 4096),  # H = 4096, the benchmark's hidden size
]


def _random(shape, dtype, seed, device=DEVICE):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 2).to(device=device, dtype=dtype)


def _check_forward_backward(x: torch.Tensor, backend: str, approximate: str, seed: int = 0) -> None:
    x_before = x.clone()
    grad_out = _random((*x.shape[:-1], x.shape[-1] // 2), x.dtype, seed + 1, x.device)
    x_ref = x.detach().double().requires_grad_(True)
    expected = geglu_reference(x_ref, approximate)
    (expected_grad,) = torch.autograd.grad(expected, x_ref, grad_out.double())

    x = x.detach().requires_grad_(True)
    with fastvision.use_backend(backend):
        out = geglu(x, approximate)
        (grad,) = torch.autograd.grad(out, x, grad_out)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(out, expected, x.dtype)
    # The gate gradient multiplies value by gelu'(gate): allow twice the rounding.
    assert_close(grad, expected_grad, x.dtype, scale=2.0)
    torch.testing.assert_close(x.detach(), x_before, atol=0, rtol=0)  # input untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_reference(backend, dtype, shape, approximate):
    _check_forward_backward(
        _random(shape, dtype, seed=stable_seed(shape, dtype) % 2**31), backend, approximate
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_hidden(backend):
    _check_forward_backward(_random((3, 2 * 65536), torch.float32, seed=5), backend, "none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t[:, :, :20], id="row-strided"),  # unit last stride, rows of 64
        pytest.param(lambda t: t[:, :, ::2], id="last-dim-strided"),
        pytest.param(lambda t: t.transpose(0, 1), id="transposed"),
        pytest.param(lambda t: t[1:, :, 4:24], id="offset-view"),
    ],
)
def test_non_contiguous(backend, make):
    base = _random((6, 5, 64), torch.float32, seed=11)
    x = make(base)
    assert not x.is_contiguous()
    _check_forward_backward(x, backend, "none")
    _check_forward_backward(x, backend, "tanh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 4), (2, 0)], ids=str)
def test_empty(backend, shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    with fastvision.use_backend(backend):
        out = geglu(x)
        out.sum().backward()
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_closed_form_backward_matches_autograd(approximate):
    x = _random((9, 30), torch.float64, seed=3)
    grad_out = _random((9, 15), torch.float64, seed=4)
    x.requires_grad_(True)
    (expected,) = torch.autograd.grad(geglu_reference(x, approximate), x, grad_out)
    torch.testing.assert_close(geglu_backward_reference(grad_out, x.detach(), approximate), expected)


def test_erf_and_tanh_differ():
    x = torch.linspace(-3, 3, 64, dtype=torch.float64).repeat(2).view(1, 128)
    assert (geglu_reference(x, "none") - geglu_reference(x, "tanh")).abs().max() > 1e-5


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "triton"])
def test_triton_poisoned_output_is_overwritten(backend):
    """The kernels must write every output element: start from NaN-filled buffers."""
    from fastvision.triton_kernels.geglu import geglu_backward, geglu_forward

    x = _random((37, 2 * 129), torch.float32, seed=8)
    out = torch.full((37, 129), float("nan"), device=DEVICE)
    geglu_forward(x, "none", out=out)
    assert_close(out, geglu_reference(x.double()), torch.float32)
    dx = torch.full_like(x, float("nan"))
    grad_out = _random((37, 129), torch.float32, seed=9)
    geglu_backward(grad_out, x, "none", out=dx)
    assert_close(dx, geglu_backward_reference(grad_out.double(), x.double()), torch.float32, scale=2.0)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "triton"])
@pytest.mark.parametrize("hidden", [48, 80, 120, 1000], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_triton_rows_cut_into_equal_blocks(backend, hidden, approximate):
    """Rows that are not a power of two run in several equal column blocks (48 = 3 x 16, 80 = 5 x 16,
    120 = 8 x 16 with the last partial, 1000 in one 1024-wide block): every output written, poisoned
    buffers overwritten, forward and backward against float64."""
    from fastvision.triton_kernels.geglu import geglu_backward, geglu_forward

    x = _random((19, 2 * hidden), torch.float32, seed=hidden)
    out = torch.full((19, hidden), float("nan"), device=DEVICE)
    geglu_forward(x, approximate, out=out)
    assert_close(out, geglu_reference(x.double(), approximate), torch.float32)
    grad_out = _random((19, hidden), torch.float32, seed=hidden + 1)
    dx = torch.full_like(x, float("nan"))
    geglu_backward(grad_out, x, approximate, out=dx)
    expected = geglu_backward_reference(grad_out.double(), x.double(), approximate)
    assert_close(dx, expected, torch.float32, scale=2.0)


def test_block_width_pads_least():
    from fastvision.triton_kernels.geglu import MAX_BLOCK_N, MIN_BLOCK_N, block_width

    assert block_width(3072) == 1024  # 3 x 1024, no idle lane (2048 would idle a quarter)
    assert block_width(768) == 256 and block_width(1536) == 512 and block_width(384) == 128
    assert block_width(1000) == 1024  # one block, 2% idle
    assert block_width(2048) == 2048 and block_width(1 << 20) == MAX_BLOCK_N
    assert block_width(1) == MIN_BLOCK_N
    for hidden in range(1, 5000, 7):
        width = block_width(hidden)
        padded = -(-hidden // width) * width
        least = min(-(-hidden // w) * w for w in (16, 32, 64, 128, 256, 512, 1024, 2048))
        assert 16 * padded <= 17 * least, hidden


# --- errors --------------------------------------------------------------------------------------


def test_rejects_odd_last_dimension():
    with pytest.raises(ValueError, match="x must have an even last dimension"):
        geglu(torch.randn(4, 7))


def test_rejects_integer_dtype():
    with pytest.raises(TypeError, match="x must have dtype"):
        geglu(torch.ones(4, 8, dtype=torch.int32))


def test_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu(torch.randn(4, 8), approximate="sigmoid")


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        geglu([1.0, 2.0])


def test_rejects_scalar():
    with pytest.raises(ValueError, match="even last dimension"):
        geglu(torch.tensor(1.0))


def test_forced_backend_that_cannot_run_raises():
    x = torch.randn(4, 8)  # a CPU tensor: the cuda backend can never take it
    with fastvision.use_backend("cuda"), pytest.raises(fastvision.BackendUnavailableError, match="cuda"):
        geglu(x)


def test_use_backend_validates_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvision.use_backend("opencl")


def test_use_backend_restores_previous_choice():
    before = fastvision.forced_backend()
    with fastvision.use_backend("reference"):
        assert fastvision.forced_backend() == "reference"
    assert fastvision.forced_backend() == before


# --- registration: opcheck, compile, export --------------------------------------------------------


def _registered_ops(device: torch.device):
    ops = []
    if OPS["geglu"].built("cpu") is None:
        ops.append(pytest.param(torch.ops.fastvision.geglu_forward.default, id="cpp"))
    from fastvision._backend import why_unusable

    if why_unusable("triton", device) is None:
        ops.append(pytest.param(torch.ops.fastvision.geglu_triton_forward.default, id="triton"))
    return ops


@pytest.mark.parametrize("op", _registered_ops(DEVICE))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck(op, approximate):
    x = _random((3, 5, 18), torch.float32, seed=21).requires_grad_(True)
    torch.library.opcheck(op, (x, approximate))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch.manual_seed(0)
    module = FeedForward(16, mult=2).to(DEVICE)
    x = _random((2, 5, 16), torch.float32, seed=13).requires_grad_(True)
    x_eager = x.detach().clone().requires_grad_(True)
    with fastvision.use_backend(backend):
        expected = module(x_eager)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x_eager)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export(backend):
    torch.manual_seed(0)
    module = FeedForward(16, mult=2).eval().to(DEVICE)
    x = _random((2, 5, 16), torch.float32, seed=14)
    with fastvision.use_backend(backend):
        exported = torch.export.export(module, (x,))
        expected = module(x)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    if backend != "reference":
        assert any("fastvision" in t and "geglu" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), expected)


def test_feedforward_state_dict_is_backend_independent():
    torch.manual_seed(0)
    module = FeedForward(12, mult=3)
    names = set(module.state_dict())
    assert names == {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}
    assert module.proj_in.out_features == 2 * 36
    for activation in ("gelu", "relu"):
        assert set(FeedForward(12, mult=3, activation=activation).state_dict()) == names


def test_geglu_module_matches_reference():
    x = _random((4, 10), torch.float32, seed=2)
    torch.testing.assert_close(GEGLU("tanh")(x), geglu_reference(x, "tanh"), atol=1e-5, rtol=1e-5)


def test_feedforward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, activation="swish")


# Not the reference backend: eager float32 tanh-GELU backward itself misses this tolerance.
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradient_accurate_where_gelu_saturates(backend, approximate):
    """Where tanh(u) is near +-1, forming 1 - tanh^2 loses most digits of the gate gradient."""
    gate = torch.linspace(-8, 8, 1024, device=DEVICE)
    value = _random((1024,), torch.float32, seed=31) * 4
    x = torch.cat([value, gate]).view(1, 2048).requires_grad_(True)
    grad_out = _random((1, 1024), torch.float32, seed=32)
    x_ref = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(geglu_reference(x_ref, approximate), x_ref, grad_out.double())
    with fastvision.use_backend(backend):
        (grad,) = torch.autograd.grad(geglu(x, approximate), x, grad_out)
    torch.testing.assert_close(grad.double().cpu(), expected.cpu(), atol=2e-6, rtol=2e-5)


# --- the limits at -inf, and direct calls of the registered ops ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_of_minus_infinity_gives_the_limit(backend, approximate, dtype):
    """gelu(-inf) = 0 and its derivative 0: every backend, the reference included, gives the limits
    (the reference runs without the extension and under torch.func)."""
    x = _random((3, 8), dtype, 261)
    x[0, 4] = float("-inf")  # a gate
    x[2, 7] = float("-inf")
    x = x.requires_grad_(True)
    grad_out = _random((3, 4), dtype, 262)
    with fastvision.use_backend(backend):
        out = geglu(x, approximate)
        (dx,) = torch.autograd.grad(out, x, grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all(), (out, dx)
    assert out[0, 0] == 0 and out[2, 3] == 0
    assert dx[0, 0] == 0 and dx[0, 4] == 0 and dx[2, 3] == 0 and dx[2, 7] == 0
    finite = x.detach().clone()
    finite[0, 4] = finite[2, 7] = 0.0  # gelu(0) = 0 as well: the other elements must not change
    expected = geglu_reference(finite.double(), approximate)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 0] = keep[2, 3] = False
    assert_close(out[keep], expected[keep], dtype)


def test_reference_gives_the_limit_under_torch_func():
    x = torch.tensor([[1.5, -2.0, float("-inf"), 0.5]])
    out = torch.func.vmap(geglu_reference)(x)
    torch.testing.assert_close(out, geglu_reference(torch.tensor([[1.5, -2.0, -1e30, 0.5]]).clamp_min(-1e4)))
    assert out[0, 0] == 0
    dx = torch.func.grad(lambda t: geglu_reference(t).sum())(x)
    assert torch.isfinite(dx).all() and dx[0, 2] == 0
    assert torch.isfinite(geglu_backward_reference(torch.ones(1, 2), x, "tanh")).all()


@pytest.mark.skipif(
    fastvision._backend.why_unusable("triton", DEVICE) is not None, reason="triton cannot run here"
)
def test_triton_ops_check_their_inputs():
    x = _random((4, 8), torch.float32, 263)
    with pytest.raises(ValueError, match="even last dimension"):
        torch.ops.fastvision.geglu_triton_forward(x[:, :7], "none")
    with pytest.raises(ValueError, match="approximate must be one of"):
        torch.ops.fastvision.geglu_triton_forward(x, "fast")
    with pytest.raises(ValueError, match=r"grad_out must be .* of shape \[4, 4\]"):
        torch.ops.fastvision.geglu_triton_backward(x[:2, :4], x, "none")
