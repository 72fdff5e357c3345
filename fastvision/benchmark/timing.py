"""Timing and ceilings: per-call times from device events (CUDA) or the wall clock (CPU), taken
round-robin over the implementations being compared so that load on the machine hits them alike,
their spread, ratios from paired measurements, and the measured device-to-device copy bandwidth
that throughput is reported against."""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2, so each rep starts cold

# A row whose interquartile range passes this share of its median is marked noisy.
NOISE_THRESHOLD = 0.1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Spread:
    """Summary of one implementation's per-call times (milliseconds)."""

    reps: int
    min_ms: float
    q1_ms: float
    median_ms: float
    q3_ms: float
    max_ms: float

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def rel_iqr(self) -> float:
        """Interquartile range over the median (0 when the median is 0)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    def noisy(self, threshold: float = NOISE_THRESHOLD) -> bool:
        return self.rel_iqr > threshold


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def spread(samples_ms: list[float]) -> Spread:
    if not samples_ms:
        raise ValueError("spread() needs at least one sample")
    q1, median, q3 = _quartiles(sorted(samples_ms))
    return Spread(len(samples_ms), min(samples_ms), q1, median, q3, max(samples_ms))


def paired_ratio(numerator_ms: list[float], denominator_ms: list[float]) -> float | None:
    """Median over repetitions of ``numerator[i] / denominator[i]``: each pair was timed in the
    same round, so load that slows a round slows both sides of its ratio.

    ``None`` without a complete pair (e.g. one side failed partway)."""
    pairs = [n / d for n, d in zip(numerator_ms, denominator_ms, strict=False) if d > 0]
    return statistics.median(pairs) if pairs else None


class _CudaTimer:
    """Device events around each call, an L2 flush before it; read once, after all rounds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.pending: dict[str, list[tuple[Any, Any]]] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> None:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        begin.record()
        fn()
        end.record()
        self.pending.setdefault(name, []).append((begin, end))

    def results(self) -> dict[str, list[float]]:
        torch.cuda.synchronize(self.device)
        return {name: [b.elapsed_time(e) for b, e in events] for name, events in self.pending.items()}


class _WallTimer:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.samples: dict[str, list[float]] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> None:
        begin = self.clock()
        fn()
        self.samples.setdefault(name, []).append((self.clock() - begin) * 1e3)

    def results(self) -> dict[str, list[float]]:
        return self.samples


def interleaved_samples_ms(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    *,
    budget_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 200,
    clock: Callable[[], float] = time.perf_counter,
    errors: dict[str, str] | None = None,
    raise_errors: bool = False,
) -> dict[str, list[float]]:
    """Per-call times in milliseconds of every function in ``fns``, taken round-robin: round ``i``
    calls each function once, so sample ``i`` of every function comes from the same moment.

    Each function first runs once untimed (compilation, autotuning, loading), then up to three
    times to size the run (the fastest of these counts, so one call slowed by load does not cut
    the number of rounds): the number of rounds fills about ``budget_s`` in all, within
    ``[min_reps, max_reps]``. The starting function rotates from round to round so none always
    runs first after the previous round's last. On CUDA each call is timed with device events
    after an L2 flush; on the CPU with ``clock`` (``time.perf_counter``).

    A function that raises is dropped from later rounds; its message goes into ``errors`` (when
    given) and its samples are discarded, so that every returned list has the same length. With
    ``raise_errors`` the exception propagates instead.
    """
    errors = {} if errors is None else errors
    live: dict[str, Callable[[], Any]] = {}
    estimate_s = 0.0
    for name, fn in fns.items():
        try:
            fn()
            synchronize(device)
            estimate_s += _estimate_s(fn, device, clock, budget_s / max(1, len(fns)))
            live[name] = fn
        except Exception as exc:  # noqa: BLE001  (reported by name, the others still run)
            if raise_errors:
                raise
            errors[name] = _message(exc)
    if not live:
        return {}
    reps = int(min(max_reps, max(min_reps, budget_s / estimate_s)))
    timer: _CudaTimer | _WallTimer = _CudaTimer(device) if device.type == "cuda" else _WallTimer(clock)
    order = list(live)
    for rep in range(reps):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            if name in errors:
                continue
            try:
                timer.time(name, live[name])
            except Exception as exc:  # noqa: BLE001
                if raise_errors:
                    raise
                errors[name] = _message(exc)
    samples = timer.results()
    return {name: samples[name] for name in order if name not in errors}


def _estimate_s(
    fn: Callable[[], Any], device: torch.device, clock: Callable[[], float], budget_s: float
) -> float:
    best, spent = float("inf"), 0.0
    for _ in range(3):
        start = clock()
        fn()
        synchronize(device)
        elapsed = clock() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s / 4:
            break
    return max(best, 1e-6)


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def median_time_ms(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    budget_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 200,
) -> float:
    """Median time of one call of ``fn`` in milliseconds, after warm-up, within about ``budget_s``."""
    samples = interleaved_samples_ms(
        {"fn": fn}, device, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps, raise_errors=True
    )
    return statistics.median(samples["fn"])


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable processes), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def distribution_version(distribution: str) -> str:
    """The installed version of a peer package (its pip name), for the note of its benchmark row."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def module_version(module_name: str) -> str | None:
    """``__version__`` of an optional module; ``None`` when absent, a note when it fails to import."""
    if importlib.util.find_spec(module_name) is None:
        return None
    try:
        return getattr(importlib.import_module(module_name), "__version__", "present")
    except Exception as exc:  # noqa: BLE001  (a broken optional install is reported, not fatal)
        return f"present but fails to import ({type(exc).__name__})"
