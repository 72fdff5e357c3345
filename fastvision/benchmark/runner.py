"""Runs the benchmark cases: checks every implementation against the reference, then times it.

Used by ``fastvision bench`` (a table, and optionally JSON/CSV) and by ``bench/`` (pytest-benchmark).
"""

from __future__ import annotations

import datetime
import importlib
import json
import pkgutil
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastvision.benchmark.case import BenchCase
from fastvision.benchmark.timing import copy_bandwidth_gbps, median_time_ms

_NOT_OPS = {"case", "runner", "timing"}


def op_names() -> list[str]:
    import fastvision.benchmark as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in _NOT_OPS)


def load_cases(op: str, device: torch.device, quick: bool) -> list[BenchCase]:
    if op not in op_names():
        raise ValueError(f"no benchmark cases for op {op!r}; available: {', '.join(op_names())}")
    module = importlib.import_module(f"fastvision.benchmark.{op}")
    return list(module.cases(device, quick))


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
    op: str
    case: str
    impl: str
    ok: bool
    error: str | None
    median_ms: float | None
    gbps: float | None
    pct_copy_bw: float | None
    tflops: float | None
    vs_reference: float | None
    vs_compile: float | None
    items_per_s: float | None = None
    vs_peer: float | None = None
    note: str = ""


def run_case(case: BenchCase, device: torch.device, copy_gbps: float, budget_s: float) -> list[BenchRow]:
    try:
        expected = case.impls["reference"]()
    except Exception as exc:  # noqa: BLE001  (e.g. the reference runs out of memory at this size)
        error = f"reference failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [
            BenchRow(case.op, case.label, name, False, error, None, None, None, None, None, None)
            for name in case.impls
        ]
    rows: list[BenchRow] = []
    times: dict[str, float] = {}
    for name, fn in case.impls.items():
        error = None
        try:
            if name != "reference":
                error = check_output(fn(), expected, case.tolerance)
            ms = median_time_ms(fn, device, budget_s=budget_s) if error is None else None
        except Exception as exc:  # noqa: BLE001  (a failing implementation is reported, not fatal)
            error, ms = f"{type(exc).__name__}: {exc}".splitlines()[0][:160], None
        if ms is not None:
            times[name] = ms
        gbps = case.bytes_moved / (ms * 1e-3) / 1e9 if ms and case.bytes_moved else None
        rows.append(
            BenchRow(
                op=case.op,
                case=case.label,
                impl=name,
                ok=error is None,
                error=error,
                median_ms=ms,
                gbps=gbps,
                pct_copy_bw=100 * gbps / copy_gbps if gbps else None,
                tflops=case.flops / (ms * 1e-3) / 1e12 if ms and case.flops else None,
                vs_reference=None,
                vs_compile=None,
                items_per_s=case.items / (ms * 1e-3) if ms and case.items else None,
                note=case.notes.get(name, ""),
            )
        )
    for row in rows:
        if row.median_ms:
            if "reference" in times:
                row.vs_reference = times["reference"] / row.median_ms
            if "compile" in times:
                row.vs_compile = times["compile"] / row.median_ms
            if case.peer is not None and case.peer in times:
                row.vs_peer = times[case.peer] / row.median_ms
    return rows


def environment(device: torch.device, copy_gbps: float) -> dict[str, Any]:
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

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        "fastvision": fastvision.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_revision": revision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def run(
    ops: Iterable[str], device: torch.device, quick: bool, budget_s: float | None = None
) -> tuple[dict[str, Any], list[BenchRow]]:
    budget_s = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    copy_gbps = copy_bandwidth_gbps(device)
    rows: list[BenchRow] = []
    for op in ops:
        for case in load_cases(op, device, quick):
            rows.extend(run_case(case, device, copy_gbps, budget_s))
    return environment(device, copy_gbps), rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(env: dict[str, Any], rows: list[BenchRow]) -> str:
    header = ["op", "case", "impl", "check", "median ms", "GB/s", "% copy", "TFLOP/s", "items/s"]
    header += ["x ref", "x compile", "x peer"]
    lines = [
        [r.op, r.case, r.impl, "ok" if r.ok else f"FAIL {r.error}"]
        + [_fmt(r.median_ms, ".4f"), _fmt(r.gbps, ".1f"), _fmt(r.pct_copy_bw, ".0f"), _fmt(r.tflops, ".2f")]
        + [_fmt(r.items_per_s, ".0f")]
        + [_fmt(r.vs_reference, ".2f"), _fmt(r.vs_compile, ".2f"), _fmt(r.vs_peer, ".2f")]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = [
        f"device: {env['device']} ({env['device_type']}), copy bandwidth {env['copy_bandwidth_gbps']} GB/s, "
        f"torch {env['torch']}, triton {env['triton']}, "
        f"fastvision {env['fastvision']} @ {env['git_revision']}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
    ]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines]
    notes = {(r.impl, r.note) for r in rows if r.note}
    out += [f"note: {impl}: {note}" for impl, note in sorted(notes)]
    return "\n".join(out)


def write_results(path: Path, env: dict[str, Any], rows: list[BenchRow]) -> None:
    """JSON (environment + rows) at ``path``; a ``.csv`` beside it gets one row per measurement."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    import csv

    with path.with_suffix(".csv").open("w", newline="") as handle:
        fields = list(env) + list(asdict(rows[0])) if rows else list(env)
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **asdict(row)})
