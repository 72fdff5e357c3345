"""Benchmark cases: one definition feeds both ``pytest bench`` and ``fastvision bench``.

An op's file ``fastvision/benchmark/<op>.py`` defines ``cases(device, quick) -> list[BenchCase]``.
Each case builds its inputs once and offers callables for every implementation that can run
(backends, ``torch.compile`` of the reference, peers); the runner checks each against the
reference, times it, and reports throughput against the device's copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BenchCase:
    op: str
    label: str  # e.g. "fwd bf16 4096x8192"
    # name -> zero-argument callable returning the output (a tensor or tuple of tensors).
    # "reference" must be present; other names: backend names, "compile", peers ("liger", ...).
    impls: dict[str, Callable[[], Any]]
    bytes_moved: int = 0  # minimal DRAM traffic of one call: sets GB/s
    flops: int = 0  # useful floating-point operations of one call: sets TFLOP/s
    items: int = 0  # items (e.g. images) one call processes: sets items/s
    peer: str | None = None  # the impl name of the best peer library present, for the "x peer" column
    dtype: torch.dtype = torch.float32
    # Tolerance for checking each implementation's output against "reference" (atol, rtol).
    tolerance: tuple[float, float] = (1e-5, 1e-5)
    # Peers that match only part of the semantics say so here (shown in the table).
    notes: dict[str, str] = field(default_factory=dict)


def backend_impl(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` with ``backend`` forced (so one op call goes to exactly that backend)."""
    from fastvision._backend import use_backend

    def run():
        with use_backend(backend):
            return fn()

    return run
