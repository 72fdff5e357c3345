"""Mamba and BiMamba (fastvision.nn.mamba) against a plain sequential recurrence, causality, the
bidirectional combination, mamba-ssm's parameter layout and the constructor checks. Tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvision.nn import BiMamba, Mamba
from fastvision.nn.mamba import _causal_conv1d_fn


def _recurrence(block: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's Mamba forward written out step by step in float64 (the definition, no scan op)."""
    p = {k: v.double() for k, v in block.state_dict().items()}
    hidden = hidden.double()
    batch, length, _ = hidden.shape
    xz = hidden @ p["in_proj.weight"].t()
    x, z = xz.chunk(2, dim=-1)  # [B, L, d_inner]
    # causal depthwise conv: out_t = sum_k w_k * x_{t - (K - 1) + k} + b
    width = block.d_conv
    padded = F.pad(x.transpose(1, 2), (width - 1, 0))
    weight = p["conv1d.weight"][:, 0]  # [d_inner, K]
    conv = torch.stack([(padded[:, :, t : t + width] * weight).sum(-1) for t in range(length)], dim=-1)
    x = F.silu(conv + p["conv1d.bias"][:, None]).transpose(1, 2)  # [B, L, d_inner]
    dbl = x @ p["x_proj.weight"].t()
    dt, b, c = dbl.split((block.dt_rank, block.d_state, block.d_state), dim=-1)
    delta = F.softplus(dt @ p["dt_proj.weight"].t() + p["dt_proj.bias"])  # [B, L, d_inner]
    a = -torch.exp(p["A_log"])  # [d_inner, N]
    h = torch.zeros(batch, block.d_inner, block.d_state, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * x[:, t])[:, :, None] * b[:, t, None, :]
        ys.append((h * c[:, t, None, :]).sum(-1) + p["D"] * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ p["out_proj.weight"].t()


def test_mamba_matches_the_sequential_recurrence():
    torch.manual_seed(0)
    block = Mamba(6, d_state=3, d_conv=3, expand=2)
    hidden = torch.randn(2, 7, 6)
    expected = _recurrence(block, hidden)
    torch.testing.assert_close(block(hidden).double(), expected, rtol=1e-4, atol=1e-5)


def test_mamba_is_causal():
    torch.manual_seed(1)
    block = Mamba(4, d_state=2, d_conv=2)
    hidden = torch.randn(1, 6, 4)
    changed = hidden.clone()
    changed[:, -1] += 1.0
    torch.testing.assert_close(block(hidden)[:, :-1], block(changed)[:, :-1])
    assert not torch.allclose(block(hidden)[:, -1], block(changed)[:, -1])


def test_bimamba_is_the_mean_of_both_directions():
    torch.manual_seed(2)
    bi = BiMamba(4, d_state=2, d_conv=2)
    uni = Mamba(4, d_state=2, d_conv=2)
    uni.load_state_dict({k: v for k, v in bi.state_dict().items() if k in uni.state_dict()})
    backward = Mamba(4, d_state=2, d_conv=2)
    names = {
        "conv1d_b": "conv1d",
        "x_proj_b": "x_proj",
        "dt_proj_b": "dt_proj",
        "A_b_log": "A_log",
        "D_b": "D",
    }
    state = {}
    for key, value in bi.state_dict().items():
        head, _, tail = key.partition(".")
        if head in names:
            state[names[head] + ("." + tail if tail else "")] = value
        elif key.startswith(("in_proj", "out_proj")):
            state[key] = value
    backward.load_state_dict(state)
    hidden = torch.randn(2, 5, 4)
    expected = (uni(hidden) + backward(hidden.flip(1)).flip(1)) / 2  # out_proj has no bias: linear
    torch.testing.assert_close(bi(hidden), expected, rtol=1e-5, atol=1e-6)


def test_bimamba_sees_the_whole_sequence_and_trains():
    torch.manual_seed(3)
    bi = BiMamba(4, d_state=2)
    hidden = torch.randn(1, 6, 4, requires_grad=True)
    out = bi(hidden)
    (grad,) = torch.autograd.grad(out[0, 0].sum(), hidden, retain_graph=True)
    assert grad[0, -1].abs().sum() > 0  # the first token sees the last one through the reversed scan
    out.square().mean().backward()
    for name, param in bi.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_mamba_ssm_parameter_layout():
    block = Mamba(32, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "x_proj.weight": (2 + 32, 64),
        "dt_proj.weight": (64, 2),
        "dt_proj.bias": (64,),
        "A_log": (64, 16),
        "D": (64,),
        "out_proj.weight": (32, 64),
    }
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    torch.testing.assert_close(block.A_log[0].exp(), torch.arange(1, 17, dtype=torch.float32))
    extra = set(BiMamba(32).state_dict()) - set(block.state_dict())
    reverse = ("conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias")
    assert extra == {*reverse, "A_b_log", "D_b"}


def test_mamba_rejects_a_wrong_input():
    with pytest.raises(ValueError, match="hidden"):
        Mamba(4)(torch.randn(1, 3, 5))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"d_model": 0}, ValueError, "d_model"),
        ({"d_model": 4.0}, TypeError, "d_model"),
        ({"d_model": 4, "d_state": 0}, ValueError, "d_state"),
        ({"d_model": 4, "d_state": 257}, ValueError, "d_state"),
        ({"d_model": 4, "d_conv": 0}, ValueError, "d_conv"),
        ({"d_model": 4, "expand": True}, TypeError, "expand"),
        ({"d_model": 4, "dt_rank": "full"}, ValueError, "dt_rank"),
        ({"d_model": 4, "dt_rank": 0}, ValueError, "dt_rank"),
        ({"d_model": 4, "dt_min": 0.2, "dt_max": 0.1}, ValueError, "dt_min"),
        ({"d_model": 4, "dt_max": math.nan}, ValueError, "dt_max"),
        ({"d_model": 4, "bias": 1}, TypeError, "bias"),
        ({"d_model": 4, "conv_backend": "cuda"}, ValueError, "conv_backend"),
    ],
)
@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_constructor_checks(cls, kwargs, error, name):
    with pytest.raises(error, match=name):
        cls(**kwargs)


@pytest.mark.skipif(_causal_conv1d_fn() is not None, reason="causal-conv1d is installed")
def test_causal_conv1d_asked_for_but_missing():
    with pytest.raises(ImportError, match="mamba"):
        Mamba(4, conv_backend="causal_conv1d")
    Mamba(4, conv_backend="auto")(torch.randn(1, 3, 4))  # the default falls back silently


def _large_flips(graph: torch.fx.Graph, length: int) -> list[str]:
    """The flip nodes of ``graph`` whose input spans the sequence (a flipped copy of x, z or y)."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and "flip" in str(node.target):
            value = node.args[0].meta.get("val")
            if value is None or length in tuple(value.shape):
                found.append(str(node))
    return found


def test_bimamba_graph_holds_no_flip_of_the_sequence():
    """The reversed direction runs ``selective_scan(reverse=True)`` and an anti-causal conv: the exported
    graph flips only the conv kernel (a few bytes), never x, z or the output."""
    torch.manual_seed(4)
    bi = BiMamba(8, d_state=4, d_conv=3).eval()
    length = 11
    hidden = torch.randn(2, length, 8)
    program = torch.export.export(bi, (hidden,))
    assert _large_flips(program.graph, length) == []
    scans = [n for n in program.graph.nodes if "selective_scan" in str(n.target)]
    assert len(scans) == 2, [str(n.target) for n in program.graph.nodes]
    torch.testing.assert_close(program.module()(hidden), bi(hidden))


def test_bimamba_reverse_matches_the_flipped_block_with_gradients():
    """The flip-free reversed direction equals the reversed block run on the flipped sequence, gradients
    included (every parameter of both directions)."""
    torch.manual_seed(5)
    bi = BiMamba(6, d_state=3, d_conv=4)
    hidden = torch.randn(2, 9, 6)

    def with_flips(module, h):
        x, z = module._in(h)
        y = Mamba._scan(module, x, z, module.conv1d, module.x_proj, module.dt_proj, module.A_log, module.D)
        conv_b = module._conv(x.flip(-1), module.conv1d_b)
        x_dbl = module.x_proj_b(conv_b.transpose(1, 2))
        dt, b, c = x_dbl.split((module.dt_rank, module.d_state, module.d_state), dim=-1)
        from fastvision.ops import selective_scan

        y_b = selective_scan(
            conv_b, (dt @ module.dt_proj_b.weight.t()).transpose(1, 2).contiguous(),
            -torch.exp(module.A_b_log), b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(),
            module.D_b, z.flip(-1).contiguous(), module.dt_proj_b.bias, True,
        )  # fmt: skip
        return module.out_proj(((y + y_b.flip(-1)) / 2).transpose(1, 2))

    got = bi(hidden)
    want = with_flips(bi, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(bi.parameters())
    grads = torch.autograd.grad(got.square().sum(), params)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    for name_param, a, b in zip(bi.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name_param[0])
