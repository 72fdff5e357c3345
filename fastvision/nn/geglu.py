"""GEGLU activation and the transformer feed-forward built on it."""

from __future__ import annotations

import torch
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.geglu import APPROXIMATIONS, geglu
from fastvision.profiling.ranges import nvtx_range

FEEDFORWARD_ACTIVATIONS = ("geglu", "gelu", "relu")


class GEGLU(nn.Module):
    """``x[..., 2H] -> x[..., :H] * gelu(x[..., H:])`` on the fused kernel."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = _checks.choice("approximate", approximate, APPROXIMATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("fastvision.GEGLU"):
            return geglu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class FeedForward(nn.Module):
    """Linear(dim -> hidden) -> activation -> dropout -> Linear(hidden -> dim), ``hidden = mult * dim``.

    With ``activation="geglu"`` the first projection produces ``2 * hidden`` features (value and
    gate). The parameter names are the same whichever backend runs, so state_dicts move freely.
    """

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        activation: str = "geglu",
        dropout: float = 0.0,
        approximate: str = "none",
    ):
        super().__init__()
        _checks.choice("activation", activation, FEEDFORWARD_ACTIVATIONS)
        dim, mult = _checks.positive_int("dim", dim), _checks.positive_int("mult", mult)
        _checks.dropout("dropout", dropout)
        _checks.choice("approximate", approximate, APPROXIMATIONS)
        hidden = dim * mult
        self.activation_name = activation
        self.proj_in = nn.Linear(dim, 2 * hidden if activation == "geglu" else hidden)
        if activation == "geglu":
            self.activation: nn.Module = GEGLU(approximate)
        elif activation == "gelu":
            self.activation = nn.GELU(approximate=approximate)
        else:
            self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("fastvision.FeedForward"):
            return self.proj_out(self.dropout(self.activation(self.proj_in(x))))
