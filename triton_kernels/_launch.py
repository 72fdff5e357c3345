"""Launch helpers shared by the Triton ops: row views and tile sizes."""

from __future__ import annotations

import math

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view ``[M, last]`` with unit last-dim stride, copying only when no such view exists."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def elements_per_program(device: torch.device) -> int:
    # The interpreter runs programs one by one in numpy: larger tiles amortize its per-program cost.
    return 4096 if device.type == "cuda" else 65536
