"""Runs the benchmark cases: checks every implementation against the reference, then times it.

Used by ``fastvision bench`` (a table, and optionally JSON/CSV) and by ``bench/`` (pytest-benchmark).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from dataclasses import fields as fields_of
from pathlib import Path
from typing import Any

import torch

from fastvision.benchmark.case import BenchCase
from fastvision.benchmark.timing import (
    NOISE_THRESHOLD,
    copy_bandwidth_gbps,
    interleaved_samples_ms,
    load_average,
    paired_ratio,
    spread,
)

# Benchmarks of more than one op (modules, training steps), beside each op's own cases in OPS.
SUITES = {"moe": "fastvision.benchmark.moe", "train_step": "fastvision.benchmark.train_step"}


def _modules() -> dict[str, str]:
    from fastvision.ops import OPS

    ops = {name: spec.benchmark_module for name, spec in OPS.items() if spec.benchmark_module}
    return {**ops, **SUITES}


def op_names() -> list[str]:
    return sorted(_modules())


def load_cases(op: str, device: torch.device, quick: bool) -> list[BenchCase]:
    modules = _modules()
    if op not in modules:
        raise ValueError(f"no benchmark cases for op {op!r}; available: {', '.join(sorted(modules))}")
    return list(importlib.import_module(modules[op]).cases(device, quick))


def _flatten(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flatten(item)]
    raise TypeError(f"benchmark outputs must be tensors or tuples of tensors, got {type(output).__name__}")


def check_output(actual: Any, expected: Any, tolerance: tuple[float, float]) -> str | None:
    """``None`` when ``actual`` matches ``expected`` within tolerance, else what differs."""
    atol, rtol = tolerance
    actual, expected = _flatten(actual), _flatten(expected)
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    if not expected:
        return "the reference returned no tensors"
    for a, e in zip(actual, expected, strict=True):
        if a.shape != e.shape:
            return f"shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        if a.dtype != e.dtype:
            return f"dtype {a.dtype}, expected {e.dtype}"
        if a.is_floating_point():
            a64, e64 = a.double(), e.double()
            if not torch.isfinite(a64).all() and torch.isfinite(e64).all():
                return "non-finite values"
            if not torch.allclose(a64, e64, atol=atol, rtol=rtol):
                return f"max abs error {(a64 - e64).abs().max().item():.3g}"
        elif not torch.equal(a, e):
            return "integer outputs differ"
    return None


@dataclass
class BenchRow:
    """One implementation in one case. Times are per call in milliseconds, from interleaved rounds;
    ratios are medians of per-round ratios (another implementation's time over this one's)."""

    op: str
    case: str
    impl: str
    ok: bool
    error: str | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    max_ms: float | None = None
    iqr_pct: float | None = None  # interquartile range as a percentage of the median
    reps: int = 0
    noisy: bool = False  # iqr_pct above NOISE_THRESHOLD: times and ratios of this row are uncertain
    gbps: float | None = None
    pct_copy_bw: float | None = None
    tflops: float | None = None
    items_per_s: float | None = None
    vs_reference: float | None = None
    vs_compile: float | None = None
    vs_peer: float | None = None
    note: str = ""


def run_case(
    case: BenchCase,
    device: torch.device,
    copy_gbps: float,
    budget_s: float,
    noise_threshold: float = NOISE_THRESHOLD,
    clock: Callable[[], float] = time.perf_counter,
) -> list[BenchRow]:
    """Checks every implementation against the reference, then times all that pass together,
    round-robin, in about ``budget_s`` per implementation (``clock`` times CPU calls)."""
    try:
        expected = case.impls["reference"]()
    except Exception as exc:  # noqa: BLE001  (e.g. the reference runs out of memory at this size)
        error = f"reference failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [BenchRow(case.op, case.label, name, False, error) for name in case.impls]
    errors: dict[str, str] = {}
    for name, fn in case.impls.items():
        if name == "reference":
            continue
        try:
            error = check_output(fn(), expected, case.tolerance)
        except Exception as exc:  # noqa: BLE001  (a failing implementation is reported, not fatal)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        if error is not None:
            errors[name] = error
    del expected
    timed = {name: fn for name, fn in case.impls.items() if name not in errors}
    samples = interleaved_samples_ms(
        timed, device, budget_s=budget_s * max(1, len(timed)), clock=clock, errors=errors
    )  # fmt: skip
    rows: list[BenchRow] = []
    for name in case.impls:
        row = BenchRow(case.op, case.label, name, name not in errors, errors.get(name))
        row.note = case.notes.get(name, "")
        if name in samples:
            stats = spread(samples[name])
            ms = stats.median_ms
            row.median_ms, row.min_ms, row.max_ms = ms, stats.min_ms, stats.max_ms
            row.q1_ms, row.q3_ms, row.reps = stats.q1_ms, stats.q3_ms, stats.reps
            row.iqr_pct = 100 * stats.rel_iqr
            row.noisy = stats.noisy(noise_threshold)
            if ms > 0:
                row.gbps = case.bytes_moved / (ms * 1e-3) / 1e9 if case.bytes_moved else None
                row.pct_copy_bw = 100 * row.gbps / copy_gbps if row.gbps else None
                row.tflops = case.flops / (ms * 1e-3) / 1e12 if case.flops else None
                row.items_per_s = case.items / (ms * 1e-3) if case.items else None
            if "reference" in samples:
                row.vs_reference = paired_ratio(samples["reference"], samples[name])
            if "compile" in samples:
                row.vs_compile = paired_ratio(samples["compile"], samples[name])
            if case.peer is not None and case.peer in samples:
                row.vs_peer = paired_ratio(samples[case.peer], samples[name])
        rows.append(row)
    return rows


def environment(device: torch.device, copy_gbps: float | None = None) -> dict[str, Any]:
    """Device, versions, revision, date and threads of a run; the copy bandwidth when measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        revision = None
    import fastvision

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "copy_bandwidth_gbps": None if copy_gbps is None else round(copy_gbps, 1),
        "fastvision": fastvision.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_revision": revision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if copy_gbps is None:
        del env["copy_bandwidth_gbps"]
    return env


def run(
    ops: Iterable[str],
    device: torch.device,
    quick: bool,
    budget_s: float | None = None,
    noise_threshold: float = NOISE_THRESHOLD,
    on_case: Callable[[dict[str, Any], list[BenchRow]], None] | None = None,
) -> tuple[dict[str, Any], list[BenchRow]]:
    """Runs every case of ``ops``. ``budget_s`` is the timing budget per implementation of a case;
    ``on_case(env, rows_so_far)`` is called after each case (e.g. to save partial results)."""
    budget_s = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device, copy_gbps)
    env["timing"] = (
        "implementations of a case interleaved round-robin; per-call times; ratios are medians of "
        "per-round ratios"
    )
    env["noise_threshold_pct"] = round(100 * noise_threshold, 1)
    env["load_avg_start"] = load_average()
    rows: list[BenchRow] = []
    done: set[tuple[str, str]] = set()
    for op in ops:
        for case in load_cases(op, device, quick):
            if (case.op, case.label) in done:  # listed by two ops (topk_attention includes block mode)
                continue
            done.add((case.op, case.label))
            rows.extend(run_case(case, device, copy_gbps, budget_s, noise_threshold))
            env["load_avg_end"] = load_average()
            if on_case is not None:
                on_case(env, rows)
    env["load_avg_end"] = load_average()
    return env, rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(env: dict[str, Any], rows: list[BenchRow]) -> str:
    header = ["op", "case", "impl", "check", "median ms", "min ms", "IQR %", "reps", "noisy"]
    header += ["GB/s", "% copy", "TFLOP/s", "items/s", "x ref", "x compile", "x peer"]
    lines = [
        [r.op, r.case, r.impl, "ok" if r.ok else f"FAIL {r.error}"]
        + [_fmt(r.median_ms, ".4f"), _fmt(r.min_ms, ".4f"), _fmt(r.iqr_pct, ".1f"), str(r.reps or "-")]
        + ["NOISY" if r.noisy else ""]
        + [_fmt(r.gbps, ".1f"), _fmt(r.pct_copy_bw, ".0f"), _fmt(r.tflops, ".2f")]
        + [_fmt(r.items_per_s, ".0f")]
        + [_fmt(r.vs_reference, ".2f"), _fmt(r.vs_compile, ".2f"), _fmt(r.vs_peer, ".2f")]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = [
        f"device: {env['device']} ({env['device_type']}), copy bandwidth {env['copy_bandwidth_gbps']} GB/s, "
        f"torch {env['torch']}, triton {env['triton']}, "
        f"fastvision {env['fastvision']} @ {env['git_revision']}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
    ]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    threshold = env.get("noise_threshold_pct", 100 * NOISE_THRESHOLD)
    noisy = sum(r.noisy for r in rows)
    out.append(
        f"times per call, implementations of a case timed round-robin; x ref/compile/peer: median of "
        f"per-round ratios; NOISY: IQR above {threshold:g}% of the median ({noisy} of {len(rows)} rows)"
    )
    loads = [x for x in (env.get("load_avg_start"), env.get("load_avg_end")) if x is not None]
    cpus = env.get("cpu_count")
    if loads and cpus and max(loads) > cpus:
        out.append(
            f"warning: load average {max(loads):g} on {cpus} CPUs while measuring: other processes competed "
            "for the CPU, and multi-threaded implementations suffer more from that than single-threaded ones"
        )
    out += crossover_lines(rows)
    notes = {(r.impl, r.note) for r in rows if r.note}
    out += [f"note: {impl}: {note}" for impl, note in sorted(notes)]
    return "\n".join(out)


# Sparse attention ops whose crossover N against dense SDPA is printed after the table, and what their
# sparse cases are called. Case labels: "<fwd|fwd+bwd> <dtype> BH<B*H> N<N> D<D> <setting>", the
# setting "dense" for the SDPA cases of the same op.
CROSSOVER_OPS = {"topk_attention": "token mode", "block_topk_attention": "block mode"}
_CASE_LABEL = re.compile(
    r"^(?P<pass>\S+) (?P<dtype>\S+) BH(?P<bh>\d+) N(?P<n>\d+) D(?P<d>\d+) (?P<setting>.+)$"
)
# Implementations of a case that are not the op's own backends.
_NOT_THE_OP = ("reference", "compile", "flex")


def crossover_lines(rows: list[BenchRow]) -> list[str]:
    """For each sparse attention op measured (``CROSSOVER_OPS``), pass (fwd, fwd+bwd), dtype, B*H,
    D and setting (topk, or topk_blocks x block_size): the smallest measured N at which the op's
    fastest backend has a lower median time than the fastest dense SDPA implementation of the same
    op, pass, dtype, B*H, N and D (default, flash, memory-efficient), or "none within the measured
    sizes". Only rows that passed their check and were timed count."""
    sdpa: dict[tuple, float] = {}
    sparse: dict[tuple, dict[int, float]] = {}
    for row in rows:
        match = _CASE_LABEL.match(row.case)
        if row.op not in CROSSOVER_OPS or not match or not row.ok or row.median_ms is None:
            continue
        n = int(match["n"])
        group = (row.op, match["pass"], match["dtype"], int(match["bh"]), int(match["d"]))
        if match["setting"] == "dense":
            if row.impl == "reference" or row.impl.startswith("sdpa"):
                sdpa[(*group, n)] = min(sdpa.get((*group, n), float("inf")), row.median_ms)
        elif row.impl not in _NOT_THE_OP and not row.impl.startswith("sdpa"):
            times = sparse.setdefault((*group, match["setting"]), {})
            times[n] = min(times.get(n, float("inf")), row.median_ms)
    lines = []
    for key in sorted(sparse, key=lambda k: (list(CROSSOVER_OPS).index(k[0]), *k[1:])):
        op, pass_, dtype, bh, d, setting = key
        paired = sorted((n, ms, sdpa[(op, pass_, dtype, bh, d, n)])
                        for n, ms in sparse[key].items() if (op, pass_, dtype, bh, d, n) in sdpa)  # fmt: skip
        if not paired:
            continue
        where = f"{op} ({CROSSOVER_OPS[op]}) {pass_} {dtype} BH{bh} D{d} {setting}"
        faster = [(n, ms, dense) for n, ms, dense in paired if ms < dense]
        if faster:
            n, ms, dense = faster[0]
            found = f"N = {n} ({ms:.4g} ms vs SDPA {dense:.4g} ms, {dense / ms:.2f}x)"
        else:
            found = f"none within the measured sizes (N = {', '.join(str(p[0]) for p in paired)})"
        lines.append(f"crossover vs SDPA: {where}: {found}")
    return lines


def write_results(path: Path, env: dict[str, Any], rows: list[BenchRow]) -> None:
    """JSON (environment + rows) at ``path``; a ``.csv`` beside it gets one row per measurement.
    Each file is written to a temporary name and renamed, so a reader never sees half a file."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    tmp.replace(path)
    csv_path = path.with_suffix(".csv")
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        fields = list(env) + [f.name for f in fields_of(BenchRow)]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **asdict(row)})
    tmp.replace(csv_path)
