"""Positional encodings (seed 002): learnable, and fixed sinusoidal in one and two dimensions.

Each module takes tokens ``x [B, N, dim]`` and returns ``x + pos`` with ``pos [1, N, dim]``; the 2-D
one expects the ``N = height * width`` tokens of a grid in row-major order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvision.nn import _checks


def sinusoidal_pos_embed(num_positions: int, embed_dim: int) -> torch.Tensor:
    """The Transformer's fixed embedding ``[1, num_positions, embed_dim]`` (float32):
    ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d))``."""
    num_positions = _checks.positive_int("num_positions", num_positions)
    embed_dim = _checks.positive_int("embed_dim", embed_dim)
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even (sine and cosine pairs), got {embed_dim}")
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, embed_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / embed_dim)
    )
    pe = torch.zeros(num_positions, embed_dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


def sinusoidal_pos_embed_2d(height: int, width: int, embed_dim: int) -> torch.Tensor:
    """A fixed 2-D embedding ``[1, height * width, embed_dim]``: the first half of the channels is
    the 1-D sinusoidal embedding of the row, the second half that of the column (as in MAE).
    Tokens in row-major order."""
    height = _checks.positive_int("height", height)
    width = _checks.positive_int("width", width)
    embed_dim = _checks.positive_int("embed_dim", embed_dim)
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 (sine/cosine pairs per axis), got {embed_dim}")
    rows = sinusoidal_pos_embed(height, embed_dim // 2)[0]  # [H, D/2]
    cols = sinusoidal_pos_embed(width, embed_dim // 2)[0]  # [W, D/2]
    grid = torch.cat(
        [rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)], dim=-1
    )
    return grid.reshape(1, height * width, embed_dim)


def _check_tokens(x: torch.Tensor, num_positions: int, dim: int) -> None:
    if x.dim() != 3 or x.shape[1] != num_positions or x.shape[2] != dim:
        raise ValueError(f"x must have shape [B, {num_positions}, {dim}], got {list(x.shape)}")


class LearnablePositionalEncoding(nn.Module):
    """One learned vector per position, truncated-normal (std 0.02) initialised, added to ``x``."""

    def __init__(self, num_positions: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_positions = _checks.positive_int("num_positions", num_positions)
        self.dim = _checks.positive_int("dim", dim)
        init_std = _checks.positive_float("init_std", init_std)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.num_positions, self.dim)
        return x + self.pos_embed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_positions={self.num_positions}, dim={self.dim}"


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed 1-D sinusoidal embedding (``sinusoidal_pos_embed``) added to ``x``; no parameters."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.num_positions, self.dim = num_positions, dim
        self.register_buffer("pos_embed", sinusoidal_pos_embed(num_positions, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.num_positions, self.dim)
        return x + self.pos_embed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_positions={self.num_positions}, dim={self.dim}"


class SinusoidalPositionalEncoding2d(nn.Module):
    """The fixed 2-D sinusoidal embedding (``sinusoidal_pos_embed_2d``) of a ``height x width`` grid
    added to its row-major tokens ``x [B, height * width, dim]``; no parameters."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width, self.dim = height, width, dim
        self.register_buffer("pos_embed", sinusoidal_pos_embed_2d(height, width, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.height * self.width, self.dim)
        return x + self.pos_embed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}, dim={self.dim}"
