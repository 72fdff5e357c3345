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

from fastvision.benchmark import cost_model
from fastvision.benchmark.case import BenchCase, role_of
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


def check_output(
    actual: Any, expected: Any, tolerance: tuple[float, float], max_mismatched_rows: float = 0.0
) -> str | None:
    """``None`` when ``actual`` matches ``expected`` within tolerance, else what differs. With
    ``max_mismatched_rows``, that share of each output's rows (vectors along its last dim) may fall
    outside the tolerance (near-tie selections); more is a failure."""
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
            close = torch.isclose(a64, e64, atol=atol, rtol=rtol)
            if not close.all():
                error = f"max abs error {(a64 - e64).abs().max().item():.3g}"
                if not max_mismatched_rows or a64.dim() == 0:
                    return error
                bad_rows = int((~close).reshape(-1, a64.shape[-1]).any(dim=1).sum())
                rows = a64.numel() // max(1, a64.shape[-1])
                if bad_rows > max_mismatched_rows * rows:
                    return f"{error} in {bad_rows} of {rows} rows (allowed {max_mismatched_rows:.2%})"
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
    role: str = "package"  # "reference", "compile", "peer" or "package" (the op's own backends)
    # The case's minimal DRAM bytes are within the last-level cache: its GB/s are cache bandwidth and
    # its share of the copy bandwidth (a DRAM figure) says little.
    cache_resident: bool = False
    # The cost model's lower bound on a GPU (cost_model.py): a prediction, beside the measured median.
    predicted_ms: float | None = None
    binds: str = ""
    predicted_terms: str = ""
    measured_over_predicted: float | None = None
    slower_because: str = ""
    bytes_moved: int = 0
    device_type: str = ""


def last_level_cache_bytes(device: torch.device) -> int | None:
    """L2 size of a CUDA device; the largest CPU cache the OS reports (sysfs); None if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=None)


def case_prediction(case: BenchCase, model: cost_model.DeviceModel) -> cost_model.Prediction:
    """The cost model's bound for one GPU case: bytes, FLOPs on the class its kernels use (the case's
    ``flop_class``, else the budget table's hot loops), hot-loop instructions from the budget table."""
    flop_class = case.flop_class or (budget_flop_class(case.op, case.dtype) if case.flops else None)
    instructions = None
    for kernel, scores in case.hot_loop_scores.items():
        per_score = budget_instructions_per_score(kernel, case.dtype)
        if per_score is not None:
            instructions = (instructions or 0.0) + cost_model.warp_instructions_from_sass(per_score, scores)
    return cost_model.predict(case.bytes_moved, case.flops, flop_class or "cuda_core", instructions, model)


_BUDGET: dict[str, Any] | None = None
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _budget_rows() -> list[dict[str, Any]]:
    """Rows of the committed sm_90 budget table (bench/results/kernel_budget.json; [] if absent)."""
    global _BUDGET
    if _BUDGET is None:
        path = Path(__file__).resolve().parents[2] / "bench" / "results" / "kernel_budget.json"
        try:
            _BUDGET = json.loads(path.read_text())
        except (OSError, ValueError):
            _BUDGET = {}
    return _BUDGET.get("triton", [])


def budget_flop_class(op: str, dtype: torch.dtype) -> str:
    """The tensor-core class the op's Triton kernels compile to for ``dtype`` on sm_90: "wgmma" when
    a hot loop holds HGMMA, "mma" for HMMA, else "cuda_core" (also when the table is absent)."""
    from fastvision.ops import OPS

    module = (OPS[op].triton_module or "").rsplit(".", 1)[-1] if op in OPS else ""
    rows = [r for r in _budget_rows() if r["module"] == module and r["dtype"] == _DTYPE_NAMES.get(dtype)]
    counts = [r.get("hot_loop") or {} for r in rows]
    if any(c.get("HGMMA") for c in counts):
        return "wgmma"
    return "mma" if any(c.get("HMMA") for c in counts) else "cuda_core"


def budget_instructions_per_score(kernel: str, dtype: torch.dtype) -> float | None:
    """Fewest SASS instructions per score of ``kernel``'s main loop over its configurations for
    ``dtype`` (the fast path over the scores each thread owns per iteration): a lower bound."""
    figures = [
        r["loop_fast_path"] / r["loop_scores_per_thread"]
        for r in _budget_rows()
        if r["kernel"] == kernel and r["dtype"] == _DTYPE_NAMES.get(dtype)
        and r.get("loop_fast_path") and r.get("loop_scores_per_thread")
    ]  # fmt: skip
    return min(figures, default=None)


def use_budget_rows(rows: list[dict[str, Any]]) -> None:
    """Read the hot-loop facts from ``rows`` (a budget run's own) instead of the committed table."""
    global _BUDGET
    _BUDGET = {"triton": rows}


def predicted_gpu_cases(
    ops: Iterable[str] | None = None, model: cost_model.DeviceModel = cost_model.H100
) -> tuple[list[dict[str, Any]], list[str]]:
    """The cost model's bound for every GPU benchmark case (``quick=False`` on CUDA), built here without
    a GPU: the cases' tensors are fake (``FakeTensorMode``: shapes and dtypes, no data, nothing runs).
    (rows, ops whose cases cannot be built that way, with the reason: data-dependent set-up)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows, skipped = [], []
    for op in ops or op_names():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                cases = load_cases(op, torch.device("cuda"), quick=False)
        except Exception as exc:  # noqa: BLE001  (set-up that reads data cannot run on fake tensors)
            skipped.append(f"{op}: {type(exc).__name__}: {exc}".splitlines()[0][:160])
            continue
        seen = set()
        for case in cases:
            if (case.op, case.label) in seen:
                continue
            seen.add((case.op, case.label))
            p = case_prediction(case, model)
            rows.append({
                "op": case.op, "case": case.label, "bytes": case.bytes_moved, "flops": case.flops,
                "flop_class": p.flop_class, "memory_ms": p.memory_ms, "compute_ms": p.compute_ms,
                "issue_ms": p.issue_ms, "bound_ms": p.bound_ms, "binds": p.binds,
            })  # fmt: skip
    return rows, skipped


def run_case(
    case: BenchCase,
    device: torch.device,
    copy_gbps: float,
    budget_s: float,
    noise_threshold: float = NOISE_THRESHOLD,
    clock: Callable[[], float] = time.perf_counter,
    llc_bytes: int | None = None,
    model: cost_model.DeviceModel | None = None,
) -> list[BenchRow]:
    """Checks every implementation against the reference, then times all that pass together,
    round-robin, in about ``budget_s`` per implementation (``clock`` times CPU calls). ``model``: the
    GPU cost model whose bound each row carries (CUDA runs); ``llc_bytes``: the last-level cache,
    below which a case counts as cache-resident."""
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
            output = fn()
            if name in case.adapt:
                output = case.adapt[name](output)
            error = check_output(output, expected, case.tolerance, case.max_mismatched_rows)
        except Exception as exc:  # noqa: BLE001  (a failing implementation is reported, not fatal)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        if error is not None:
            errors[name] = error
    del expected
    timed = {name: fn for name, fn in case.impls.items() if name not in errors}
    samples = interleaved_samples_ms(
        timed, device, budget_s=budget_s * max(1, len(timed)), clock=clock, errors=errors
    )  # fmt: skip
    prediction = case_prediction(case, model) if model is not None else None
    rows: list[BenchRow] = []
    for name in case.impls:
        row = BenchRow(case.op, case.label, name, name not in errors, errors.get(name))
        row.note = case.notes.get(name, "")
        row.role, row.slower_because = role_of(case, name), case.slower_because
        row.bytes_moved, row.device_type = case.bytes_moved, device.type
        row.cache_resident = bool(llc_bytes and case.bytes_moved and case.bytes_moved <= llc_bytes)
        if prediction is not None and prediction.bound_ms is not None:
            row.predicted_ms, row.binds = prediction.bound_ms, prediction.binds
            row.predicted_terms = prediction.describe()
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
            if row.predicted_ms:
                row.measured_over_predicted = ms / row.predicted_ms
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
    llc = last_level_cache_bytes(device)
    env["last_level_cache_bytes"] = llc
    model = cost_model.with_measured_bandwidth(cost_model.H100, copy_gbps) if device.type == "cuda" else None
    if model is not None:
        env["cost_model"] = (
            f"{model.name} peaks, bandwidth {model.bandwidth_gbps:.0f} GB/s {model.bandwidth_source}"
        )
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
            rows.extend(
                run_case(case, device, copy_gbps, budget_s, noise_threshold, llc_bytes=llc, model=model)
            )
            env["load_avg_end"] = load_average()
            if on_case is not None:
                on_case(env, rows)
    env["load_avg_end"] = load_average()
    return env, rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _header_lines(env: dict[str, Any]) -> list[str]:
    bandwidth = env.get("copy_bandwidth_gbps")
    llc = env.get("last_level_cache_bytes")
    lines = [
        f"device: {env['device']} ({env['device_type']}), copy bandwidth {bandwidth} GB/s"
        + (f", last-level cache {llc / 2**20:g} MiB" if llc else ""),
        f"torch {env['torch']}, triton {env['triton']}, "
        f"fastvision {env['fastvision']} @ {env['git_revision']}",
    ]
    if env.get("cost_model"):
        lines.append(f"cost model (predicted lower bounds): {env['cost_model']}")
    return lines


def _load_warning(env: dict[str, Any]) -> list[str]:
    loads = [x for x in (env.get("load_avg_start"), env.get("load_avg_end")) if x is not None]
    cpus = env.get("cpu_count")
    if loads and cpus and max(loads) > cpus:
        return [
            f"warning: load average {max(loads):g} on {cpus} CPUs while measuring: other processes competed "
            "for the CPU, and multi-threaded implementations suffer more from that than single-threaded ones"
        ]
    return []


def _share_cell(row: BenchRow) -> str:
    if row.pct_copy_bw is None:
        return "-"
    return "cache" if row.cache_resident else f"{row.pct_copy_bw:.0f}"


def format_full_table(env: dict[str, Any], rows: list[BenchRow]) -> str:
    """Every implementation of every case (``fastvision bench --full``; always in --json/--csv)."""
    header = ["op", "case", "impl", "check", "median ms", "min ms", "IQR %", "reps", "noisy"]
    header += ["GB/s", "% copy", "TFLOP/s", "items/s", "x ref", "x compile", "x peer"]
    header += ["pred ms", "binds", "meas/pred"]
    lines = [
        [r.op, r.case, r.impl, "ok" if r.ok else f"FAIL {r.error}"]
        + [_fmt(r.median_ms, ".4f"), _fmt(r.min_ms, ".4f"), _fmt(r.iqr_pct, ".1f"), str(r.reps or "-")]
        + ["NOISY" if r.noisy else ""]
        + [_fmt(r.gbps, ".1f"), _share_cell(r), _fmt(r.tflops, ".2f")]
        + [_fmt(r.items_per_s, ".0f")]
        + [_fmt(r.vs_reference, ".2f"), _fmt(r.vs_compile, ".2f"), _fmt(r.vs_peer, ".2f")]
        + [_fmt(r.predicted_ms, ".4g"), r.binds or "-", _fmt(r.measured_over_predicted, ".2f")]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = _header_lines(env)
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    threshold = env.get("noise_threshold_pct", 100 * NOISE_THRESHOLD)
    noisy = sum(r.noisy for r in rows)
    out.append(
        f"times per call, implementations of a case timed round-robin; x ref/compile/peer: median of "
        f"per-round ratios; NOISY: IQR above {threshold:g}% of the median ({noisy} of {len(rows)} rows)"
    )
    out.append(
        "% copy: share of the measured copy bandwidth, only where the case's bytes exceed the last-level "
        "cache; 'cache': cache-resident, its GB/s are cache bandwidth. pred ms: the cost model's lower "
        "bound (a prediction: max of bytes/bandwidth, FLOPs/peak, hot-loop issue), GPU runs only"
    )
    out += _load_warning(env)
    out += crossover_lines(rows)
    notes = {(r.op, r.impl, r.note) for r in rows if r.note}
    out += [f"note: {op} {impl}: {note}" for op, impl, note in sorted(notes)]
    return "\n".join(out)


def _geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def _x(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{_x(values[0])}x"
    return f"{_x(_geomean(values))}x ({_x(min(values))}-{_x(max(values))})"


def best_package_rows(rows: list[BenchRow]) -> dict[tuple[str, str], BenchRow]:
    """Per (op, case): the package implementation with the lowest median among those that passed
    their check and were timed (cases with none, e.g. dense SDPA baselines, are left out)."""
    best: dict[tuple[str, str], BenchRow] = {}
    for row in rows:
        if row.role != "package" or not row.ok or row.median_ms is None:
            continue
        key = (row.op, row.case)
        if key not in best or row.median_ms < best[key].median_ms:
            best[key] = row
    return best


# Below this reference time a case measures mostly per-call overhead (Python dispatch, launches).
_OVERHEAD_MS = 0.05


def slower_reason(row: BenchRow, reference: BenchRow | None) -> str:
    """A few words on why the package's best is slower than the reference in this case."""
    if row.slower_because:
        return row.slower_because
    if row.impl == "triton" and row.device_type == "cpu":
        return "Triton's interpreter on the CPU (TRITON_INTERPRET=1): a correctness mode, not a speed"
    noisy = row.noisy or (reference is not None and reference.noisy)
    if noisy and row.vs_reference is not None and row.vs_reference >= 0.8:
        return "noisy measurement: within the spread"
    if reference is not None and reference.median_ms is not None and reference.median_ms < _OVERHEAD_MS:
        return f"per-call overhead at a small size (reference {reference.median_ms * 1e3:.0f} us)"
    return "the kernel is slower here (see --full)"


def check_counts(rows: list[BenchRow]) -> tuple[int, int]:
    """(passed, failed) correctness checks: every implementation other than the reference, per case."""
    checked = [r for r in rows if r.impl != "reference"]
    failed = [r for r in rows if not r.ok]
    return len([r for r in checked if r.ok]), len(failed)


def exit_code(rows: list[BenchRow]) -> int:
    """1 when any check failed (an implementation, or the reference itself), else 0."""
    return 1 if any(not r.ok for r in rows) else 0


def verdict_line(rows: list[BenchRow], limit: int = 6) -> str:
    """``N checks passed, M failed; K cases slower than the reference: ...`` with a reason each."""
    passed, failed = check_counts(rows)
    refs = {(r.op, r.case): r for r in rows if r.impl == "reference"}
    slower = [
        (key, row) for key, row in best_package_rows(rows).items()
        if row.vs_reference is not None and row.vs_reference < 1
    ]  # fmt: skip
    line = f"{passed} checks passed, {failed} failed; {len(slower)} cases slower than the reference"
    if not slower:
        return line
    items = [
        f"{op} {case} {row.impl} {row.vs_reference:.2f}x ({slower_reason(row, refs.get((op, case)))})"
        for (op, case), row in slower[:limit]
    ]
    more = f"; and {len(slower) - limit} more (--full)" if len(slower) > limit else ""
    return line + ": " + "; ".join(items) + more


SUMMARY_WIDTH = 100


def format_summary(env: dict[str, Any], rows: list[BenchRow]) -> str:
    """The default output of ``fastvision bench``: one line per op within 100 columns, then the
    verdict line. Per op: every implementation's checks, the package's best backend (fastest at the
    op's largest case) and its median there, its speed-up over the reference, torch.compile and the
    peer (geometric mean over the cases, range in brackets), NOISY where one of those rows is."""
    import textwrap

    best = best_package_rows(rows)
    ops = list(dict.fromkeys(r.op for r in rows))
    header = f"{'op':<22} {'best':<10} {'ms':>9}  {'x ref':<18} {'x compile':<18} {'x peer':<9}".rstrip()
    out = _header_lines(env) + [header]
    for op in ops:
        op_rows = [r for r in rows if r.op == op]
        ours = [row for (o, _), row in best.items() if o == op]
        impls = list(dict.fromkeys(r.impl for r in op_rows if r.impl != "reference"))
        verdicts = []
        for impl in impls:
            runs = [r for r in op_rows if r.impl == impl]
            bad = sum(not r.ok for r in runs)
            verdicts.append(f"{impl} {'ok' if not bad else f'FAIL {bad}/{len(runs)}'}")
        if ours:
            largest = max(ours, key=lambda r: (r.bytes_moved, r.median_ms))
            line = f"{op:<22} {largest.impl:<10} {largest.median_ms:>9.4f}  "
            line += f"{_ratio_cell([r.vs_reference for r in ours if r.vs_reference]):<18} "
            line += f"{_ratio_cell([r.vs_compile for r in ours if r.vs_compile]):<18} "
            line += f"{_ratio_cell([r.vs_peer for r in ours if r.vs_peer]):<9}"
            noisy = sum(r.noisy for r in ours)
            mark = f" NOISY {noisy}/{len(ours)}" if noisy else ""
            line = line.rstrip()
            if len(line + mark) <= SUMMARY_WIDTH:
                line, mark = line + mark, ""
        else:
            line, mark = f"{op:<22} {'-':<10} {'-':>9}  (no package implementation timed)", ""
        out.append(line.rstrip())
        checks = ("checks: " + ", ".join(verdicts) if verdicts else "checks: none") + mark
        out += textwrap.wrap(checks, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="    ")
        predicted = [r for r in ours if r.predicted_ms]
        if predicted:
            shares = [r.predicted_ms / r.median_ms for r in predicted if r.median_ms]
            binds = sorted({r.binds for r in predicted})
            out.append(
                f"  predicted floor: {_geomean(shares) * 100:.0f}% reached (geomean), "
                f"binds: {', '.join(binds)}"
                if shares
                else f"  predicted floor: binds {', '.join(binds)}, not measured"
            )
    for warning in _load_warning(env):
        out += textwrap.wrap(warning, SUMMARY_WIDTH, subsequent_indent="  ")
    out += textwrap.wrap(
        "x ref/compile/peer: the package's fastest backend per case against each; ms: its median at the "
        "op's largest case; --full: every implementation and case, bandwidth shares (DRAM-sized cases "
        "only), the cost model's predictions",
        SUMMARY_WIDTH,
    )
    out += textwrap.wrap(verdict_line(rows), SUMMARY_WIDTH, subsequent_indent="  ")
    return "\n".join(out)


def format_table(env: dict[str, Any], rows: list[BenchRow], full: bool = False) -> str:
    """``fastvision bench``'s output: the summary (``format_summary``), or with ``full`` every row
    (``format_full_table``) followed by the verdict line."""
    if full:
        return format_full_table(env, rows) + "\n" + verdict_line(rows)
    return format_summary(env, rows)


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
