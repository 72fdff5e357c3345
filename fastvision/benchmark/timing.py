"""Timing and ceilings: medians of device-event (CUDA) or wall-clock (CPU) times, and the measured
device-to-device copy bandwidth that throughput is reported against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2, so each rep starts cold


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    budget_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 200,
) -> float:
    """Median time of one call of ``fn`` in milliseconds, after warm-up, within about ``budget_s``."""
    fn()  # compile / autotune / load outside the measurement
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / estimate)))
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for begin, end in zip(starts, ends, strict=True):
            flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(b.elapsed_time(e) for b, e in zip(starts, ends, strict=True))
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9
