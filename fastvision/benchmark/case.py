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
    # Share of output rows (vectors along the last dim) allowed outside the tolerance: attention on
    # continuous inputs, where a near-tie at the top-k threshold may select another key (0: none).
    max_mismatched_rows: float = 0.0
    # Per implementation, a conversion of its output to the reference's layout, applied only when
    # checking (never timed): a peer timed as it returns its result.
    adapt: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    # Peers that match only part of the semantics say so here (shown in the table).
    notes: dict[str, str] = field(default_factory=dict)
    # Implementations that are neither the package's nor the reference/compile/peer: dense baselines
    # such as "sdpa-flash" (names starting with "sdpa" and KNOWN_PEERS count as such by default).
    baselines: tuple[str, ...] = ()
    # Cost model inputs (fastvision/benchmark/cost_model.py), GPU cases: the instruction class the
    # FLOPs run on ("wgmma", "mma", "cuda_core"; None: read from the budget table's hot loops of the
    # op's Triton kernels), and per hot-loop kernel the scores (work units of its SASS_LOOP_WORK)
    # one call processes, for the issue term.
    flop_class: str | None = None
    hot_loop_scores: dict[str, int] = field(default_factory=dict)
    # Why the package is slower than the reference here, when it is and the reason is known.
    slower_because: str = ""


# Implementation names of peer libraries and dense baselines (not the package's own backends).
KNOWN_PEERS = ("liger", "flex", "fla", "spconv", "mamba-ssm", "mamba_ssm")


def role_of(case: BenchCase, name: str) -> str:
    """"reference", "compile", "peer" (the case's peer, a known peer or a dense baseline) or "package"."""
    if name in ("reference", "compile"):
        return name
    if name == case.peer or name in case.baselines or name.startswith("sdpa") or name in KNOWN_PEERS:
        return "peer"
    return "package"


def backend_impl(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` with ``backend`` forced (so one op call goes to exactly that backend)."""
    from fastvision._backend import use_backend

    def run():
        with use_backend(backend):
            return fn()

    return run
