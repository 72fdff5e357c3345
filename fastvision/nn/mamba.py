"""Mamba-1 blocks on ``fastvision.ops.selective_scan``: ``Mamba`` and the bidirectional ``BiMamba``.

``Mamba(d_model, d_state=16, d_conv=4, expand=2)`` is mamba-ssm's ``Mamba`` block (its parameter names,
shapes and initialisation, so state_dicts load both ways): an in-projection to ``2 * d_inner``
(``x`` and the gate ``z``), a causal depthwise convolution of ``x`` with SiLU, the ``x``-projection to
``dt_rank + 2 * d_state`` (``dt``, ``B``, ``C``), the ``dt``-projection to ``d_inner`` (its bias is the
scan's ``delta_bias``, softplus applied inside the scan), ``A = -exp(A_log)``, the skip ``D``, the
selective scan gated by ``silu(z)``, and an out-projection back to ``d_model``.

``BiMamba`` is Vision Mamba's bidirectional block ("v2"): the in- and out-projections are shared, and the
reversed direction has its own convolution, ``x``/``dt`` projections, ``A_b_log`` and ``D_b``. The output
is ``out_proj((y_forward + flip(y_backward)) / 2)`` where ``y_backward`` is the block run on the flipped
sequence. It is computed without flipping anything as large as the sequence: the reversed direction's
convolution is anti-causal (the same weights reversed along the kernel, a few bytes) and its scan runs
with ``reverse=True``, so ``x``, ``z`` and the output stay in their own time order.

The causal convolution uses ``causal_conv1d_fn`` (the ``causal-conv1d`` package, CUDA tensors) when
``conv_backend="causal_conv1d"`` is asked for, and raises an ``ImportError`` naming the ``mamba`` extra if
the package is missing; ``"auto"`` (the default) uses it when it is installed and the input is on CUDA,
else a grouped ``nn.Conv1d`` (same weights, same result); ``"torch"`` always uses the grouped conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.selective_scan import MAX_STATE, selective_scan
from fastvision.profiling.ranges import nvtx_range

CONV_BACKENDS = ("auto", "torch", "causal_conv1d")


def _causal_conv1d_fn():
    """``causal_conv1d.causal_conv1d_fn`` or None when the package is not installed."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def _require_causal_conv1d():
    fn = _causal_conv1d_fn()
    if fn is None:
        raise ImportError(
            "conv_backend='causal_conv1d' needs the causal-conv1d package, which is not installed; it is "
            "part of the 'mamba' extra (pip install 'fastvision[mamba]', a CUDA build). Use "
            "conv_backend='auto' or 'torch' for the grouped nn.Conv1d"
        )
    return fn


def _check_sizes(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, bias, conv_bias,
                 conv_backend):  # fmt: skip
    d_model = _checks.positive_int("d_model", d_model)
    d_state = _checks.positive_int("d_state", d_state)
    if d_state > MAX_STATE:
        raise ValueError(f"d_state must be <= {MAX_STATE} (the selective scan's state limit), got {d_state}")
    d_conv = _checks.positive_int("d_conv", d_conv)
    expand = _checks.positive_int("expand", expand)
    if dt_rank == "auto":
        dt_rank = math.ceil(d_model / 16)
    elif isinstance(dt_rank, str):
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    else:
        dt_rank = _checks.positive_int("dt_rank", dt_rank)
    dt_min = _checks.positive_float("dt_min", dt_min)
    dt_max = _checks.positive_float("dt_max", dt_max)
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    _checks.positive_float("dt_init_floor", dt_init_floor)
    _checks.boolean("bias", bias)
    _checks.boolean("conv_bias", conv_bias)
    _checks.choice("conv_backend", conv_backend, CONV_BACKENDS)
    if conv_backend == "causal_conv1d":
        _require_causal_conv1d()
    return d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max


class _SSMParams:
    """Builds one direction's parameters (conv, x/dt projections, A_log, D) with mamba-ssm's init."""

    @staticmethod
    def conv(d_inner: int, d_conv: int, conv_bias: bool) -> nn.Conv1d:
        return nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)

    @staticmethod
    def dt_proj(dt_rank: int, d_inner: int, dt_min: float, dt_max: float, floor: float) -> nn.Linear:
        proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank**-0.5
        nn.init.uniform_(proj.weight, -std, std)
        # dt = softplus(bias) log-uniform in [dt_min, dt_max]: the bias is softplus's inverse of it.
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        proj.bias._no_reinit = True
        return proj

    @staticmethod
    def a_log(d_inner: int, d_state: int) -> nn.Parameter:
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        param = nn.Parameter(torch.log(a))
        param._no_weight_decay = True
        return param

    @staticmethod
    def d(d_inner: int) -> nn.Parameter:
        param = nn.Parameter(torch.ones(d_inner))
        param._no_weight_decay = True
        return param


class Mamba(nn.Module):
    """Mamba-1 block: ``[batch, L, d_model] -> [batch, L, d_model]`` (causal along ``L``).

    Args:
        d_model: token features.
        d_state: SSM state size ``N`` per channel (1..256).
        d_conv: causal depthwise convolution width.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the ``dt`` projection, ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes ``softplus(dt_proj.bias)``.
        bias: biases of the in- and out-projections; conv_bias: bias of the convolution.
        conv_backend: ``"auto"``, ``"torch"`` (grouped ``nn.Conv1d``) or ``"causal_conv1d"``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        conv_backend: str = "auto",
    ):
        super().__init__()
        d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max = _check_sizes(
            d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, bias, conv_bias,
            conv_backend,
        )  # fmt: skip
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.dt_rank, self.conv_backend = expand * d_model, dt_rank, conv_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = _SSMParams.conv(self.d_inner, d_conv, conv_bias)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = _SSMParams.dt_proj(dt_rank, self.d_inner, dt_min, dt_max, dt_init_floor)
        self.A_log = _SSMParams.a_log(self.d_inner, d_state)
        self.D = _SSMParams.d(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    # ------------------------------------------------------------------------------------------- pieces
    def _conv(self, x: torch.Tensor, conv: nn.Conv1d, reverse: bool = False) -> torch.Tensor:
        """``silu(causal depthwise conv(x))`` on ``x [batch, d_inner, L]``; ``reverse``: the anti-causal
        conv, ``flip(conv(flip(x)))``, as a cross-correlation with the kernel reversed (out_t reads
        x_t .. x_{t+K-1}), the last ``L`` of the ``L + K - 1`` outputs."""
        if reverse:
            out = F.conv1d(x, conv.weight.flip(-1), conv.bias, padding=self.d_conv - 1, groups=self.d_inner)
            return F.silu(out[..., self.d_conv - 1 :])
        use_fused = self.conv_backend == "causal_conv1d" or (
            self.conv_backend == "auto" and x.is_cuda and _causal_conv1d_fn() is not None
        )
        if use_fused:
            fn = _require_causal_conv1d()
            return fn(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        return F.silu(conv(x)[..., : x.shape[-1]])

    def _scan(self, x, z, conv, x_proj, dt_proj, a_log, d, reverse: bool = False) -> torch.Tensor:
        """One direction: ``x, z [batch, d_inner, L]`` -> ``y [batch, d_inner, L]`` (``reverse``: the
        direction from the last token to the first, in the inputs' time order)."""
        x = self._conv(x, conv, reverse)
        x_dbl = x_proj(x.transpose(1, 2))  # [batch, L, dt_rank + 2N]
        dt, b, c = x_dbl.split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # [batch, d_inner, L]; bias goes to the scan
        return selective_scan(
            x.contiguous(),
            delta.contiguous(),
            -torch.exp(a_log.float()),
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            d.float(),
            z.contiguous(),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            reverse=reverse,
        )

    def _check_input(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have shape [batch, L, {self.d_model}], got {tuple(hidden.shape)}")

    def _in(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xz = self.in_proj(hidden).transpose(1, 2)  # [batch, 2 * d_inner, L]
        return xz.chunk(2, dim=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_input(hidden)
        with nvtx_range("fastvision.Mamba"):
            x, z = self._in(hidden)
            y = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
            return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"dt_rank={self.dt_rank}, conv_backend={self.conv_backend!r}"
        )


class BiMamba(Mamba):
    """Bidirectional Mamba (Vision Mamba "v2"): ``[batch, L, d_model] -> [batch, L, d_model]``.

    The in- and out-projections are shared; the reversed sequence has its own ``conv1d_b``,
    ``x_proj_b``, ``dt_proj_b``, ``A_b_log`` and ``D_b``. Output: ``out_proj((y + flip(y_b)) / 2)``,
    so every token sees the whole sequence; the reversed direction runs an anti-causal convolution and
    ``selective_scan(..., reverse=True)`` in place of flipped copies. Same arguments as :class:`Mamba`.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, **kwargs):
        super().__init__(d_model, d_state, d_conv, expand, **kwargs)
        dt_min, dt_max = kwargs.get("dt_min", 0.001), kwargs.get("dt_max", 0.1)
        floor = kwargs.get("dt_init_floor", 1e-4)
        self.conv1d_b = _SSMParams.conv(self.d_inner, self.d_conv, kwargs.get("conv_bias", True))
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj_b = _SSMParams.dt_proj(self.dt_rank, self.d_inner, dt_min, dt_max, floor)
        self.A_b_log = _SSMParams.a_log(self.d_inner, self.d_state)
        self.D_b = _SSMParams.d(self.d_inner)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_input(hidden)
        with nvtx_range("fastvision.BiMamba"):
            x, z = self._in(hidden)
            y = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
            y_b = self._scan(
                x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, reverse=True
            )
            return self.out_proj(((y + y_b) / 2).transpose(1, 2))
