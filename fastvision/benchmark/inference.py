"""Inference benchmark of the registered models: eager against ``torch.compile``, ONNX Runtime and
TensorRT, at batch 1 and a large batch (``fastvision bench-inference``).

Per model and batch size, every backend that can run is first checked against eager on the
model's ``example_inputs`` (largest absolute difference recorded) and then timed round-robin
with the other backends (``fastvision.benchmark.timing``), so that load on the machine slows all
of them alike. Each row gives the median latency of one call with its interquartile range,
throughput in samples per second, and the speed-up over eager: the median over rounds of
``eager time / this backend's time`` from the same rounds.

Backends:

- ``eager``: the inference entry (``fastvision.models.inference_module``) under ``torch.no_grad``.
- ``compile``: ``torch.compile(entry, dynamic=False)`` in the default mode (one static graph per
  batch size); the first call's time, compilation included, is the row's ``setup_s``.
- ``compile-reduce-overhead``: ``mode="reduce-overhead"`` (CUDA graphs); CUDA only.
- ``onnxruntime``: exported once per model with ``fastvision.deploy.export_onnx`` (dynamic batch;
  a static export per batch size where the dynamic one fails) into a temporary directory, run by
  ONNX Runtime's CPU execution provider with as many intra-op threads as torch uses (no spinning
  of idle pool threads, which would take cores from the next backend in the round). The inputs are
  converted to NumPy once, outside the timed calls.
- ``tensorrt``: ``fastvision.deploy.compile_tensorrt`` where torch-tensorrt is importable and the
  device is CUDA, else a row saying why it did not run.

A backend that cannot run (a model that cannot be exported, a missing package) gets a row with
the reason instead of times; the others still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastvision.benchmark.timing import (
    NOISE_THRESHOLD,
    interleaved_samples_ms,
    load_average,
    module_version,
    paired_ratio,
    spread,
    synchronize,
)

BACKENDS = ("eager", "compile", "compile-reduce-overhead", "onnxruntime", "tensorrt")
DEFAULT_BATCHES = (1, 32)
DEFAULT_BUDGET_S = 1.5
QUICK_BUDGET_S = 0.25
# Largest |backend - eager| accepted, relative to the output's magnitude (at least 1): float32
# programs reorder reductions; more than this is a wrong result, not rounding.
OUTPUT_TOLERANCE = 1e-3
ONNX_EXPORT_BATCH = 2  # a dynamic-batch export traces a batch above 1 (size 1 would specialize)


@dataclass
class InferenceRow:
    """One backend of one model at one batch size; times per call in milliseconds."""

    model: str
    batch: int
    backend: str
    ok: bool
    error: str | None = None
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    iqr_pct: float | None = None  # interquartile range as a percentage of the median
    reps: int = 0
    noisy: bool = False  # iqr_pct above the noise threshold: times and ratios are uncertain
    samples_per_s: float | None = None
    vs_eager: float | None = None  # speed-up: median over rounds of eager time / this time
    max_abs_diff: float | None = None  # largest |output - eager output| on the example inputs
    setup_s: float | None = None  # compile: first call (compilation); onnxruntime: export + session
    note: str = ""


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with torch.no_grad():
            return fn(*args)

    return run


def _timed_first_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    begin = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - begin


class _OnnxModel:
    """One ONNX export of a model (dynamic batch, else static per batch size) and its sessions."""

    def __init__(self, module: torch.nn.Module, name: str, directory: Path, device: torch.device):
        self.module, self.name, self.directory, self.device = module, name, directory, device
        self.dynamic_path: Path | None = None
        self.dynamic_error: str | None = None
        self.export_s = 0.0

    def _session(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle pool threads would otherwise spin after each call, taking cores from the backend
        # timed next in the round.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _export(self, batch: int, dynamic: bool) -> tuple[Path, float]:
        from fastvision.deploy import export_onnx
        from fastvision.models import example_inputs

        suffix = "dynamic" if dynamic else f"b{batch}"
        path = self.directory / f"{self.name}.{suffix}.onnx"
        inputs = example_inputs(self.name, batch, device=self.device)
        begin = time.perf_counter()
        with torch.no_grad():
            export_onnx(self.module, inputs, path, dynamic_batch=dynamic)
        return path, time.perf_counter() - begin

    def session_for(self, batch: int) -> tuple[Any, float, str]:
        """(session, seconds spent exporting and loading, note) for inputs of ``batch`` samples."""
        note = ""
        if self.dynamic_path is None and self.dynamic_error is None:
            try:
                self.dynamic_path, self.export_s = self._export(ONNX_EXPORT_BATCH, dynamic=True)
            except Exception as exc:  # noqa: BLE001  (fall back to a static export per batch)
                self.dynamic_error = _message(exc)
        if self.dynamic_path is not None:
            begin = time.perf_counter()
            session = self._session(self.dynamic_path)
            return session, self.export_s + time.perf_counter() - begin, "dynamic-batch export"
        note = f"static export for this batch (the dynamic-batch export failed: {self.dynamic_error})"
        path, seconds = self._export(batch, dynamic=False)
        begin = time.perf_counter()
        session = self._session(path)
        return session, seconds + time.perf_counter() - begin, note


def bench_model(
    name: str,
    batches: Sequence[int],
    device: torch.device,
    budget_s: float,
    backends: Sequence[str] = BACKENDS,
    noise_threshold: float = NOISE_THRESHOLD,
    workdir: Path | None = None,
) -> list[InferenceRow]:
    """Rows for every backend of model ``name`` at each batch size (see the module docstring)."""
    from fastvision.models import create_model, inference_module

    torch._dynamo.reset()
    torch.manual_seed(0)
    try:
        model = create_model(name).to(device)
        module = inference_module(model, name)
    except Exception as exc:  # noqa: BLE001
        error = f"model: {_message(exc)}"
        return [InferenceRow(name, b, backend, False, error) for b in batches for backend in backends]
    eager = _no_grad(module)
    compiled: dict[str, Callable[..., Any]] = {}
    if "compile" in backends:
        compiled["compile"] = _no_grad(torch.compile(module, dynamic=False))
    if "compile-reduce-overhead" in backends and device.type == "cuda":
        reduce_overhead = torch.compile(module, mode="reduce-overhead", dynamic=False)
        compiled["compile-reduce-overhead"] = _no_grad(reduce_overhead)
    with tempfile.TemporaryDirectory(prefix="fastvision-onnx-", dir=workdir) as tmp:
        onnx_model = _OnnxModel(module, name, Path(tmp), device) if "onnxruntime" in backends else None
        rows: list[InferenceRow] = []
        for batch in batches:
            rows += _bench_batch(
                name, batch, device, budget_s, backends, module, eager, compiled, onnx_model, noise_threshold
            )
    del model, module, compiled
    torch._dynamo.reset()
    return rows


def _unavailable(name: str, batch: int, backend: str, device: torch.device) -> str | None:
    if backend == "compile-reduce-overhead" and device.type != "cuda":
        return "CUDA only (CUDA graphs)"
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed"
    if backend == "tensorrt":
        if importlib.util.find_spec("torch_tensorrt") is None:
            return "torch-tensorrt not installed"
        if device.type != "cuda":
            return "TensorRT needs a CUDA device"
    return None


def _bench_batch(
    name: str,
    batch: int,
    device: torch.device,
    budget_s: float,
    backends: Sequence[str],
    module: torch.nn.Module,
    eager: Callable[..., Any],
    compiled: dict[str, Callable[..., Any]],
    onnx_model: _OnnxModel | None,
    noise_threshold: float,
) -> list[InferenceRow]:
    from fastvision.deploy import max_abs_difference, tensor_leaves
    from fastvision.models import example_inputs

    rows = {b: InferenceRow(name, batch, b, True) for b in dict.fromkeys(["eager", *backends])}
    inputs = example_inputs(name, batch, device=device)
    try:
        expected, _ = _timed_first_call(lambda: eager(*inputs), device)
    except Exception as exc:  # noqa: BLE001  (eager itself fails: nothing to compare with)
        for row in rows.values():
            row.ok, row.error = False, f"eager failed: {_message(exc)}"
        return list(rows.values())
    fns: dict[str, Callable[[], Any]] = {"eager": lambda: eager(*inputs)}
    floats = [t for t in tensor_leaves(expected) if t.is_floating_point() and t.numel()]
    scale = max([1.0, *(t.abs().max().item() for t in floats)])
    for backend, row in rows.items():
        if backend == "eager":
            continue
        reason = _unavailable(name, batch, backend, device)
        if reason is not None:
            row.ok, row.error = False, reason
            continue
        try:
            if backend in compiled:
                fn = (lambda f: lambda: f(*inputs))(compiled[backend])
                out, row.setup_s = _timed_first_call(fn, device)
                row.max_abs_diff = max_abs_difference(expected, tensor_leaves(out))
            elif backend == "onnxruntime":
                session, row.setup_s, row.note = onnx_model.session_for(batch)
                feeds = {
                    meta.name: t.detach().cpu().numpy()
                    for meta, t in zip(session.get_inputs(), inputs, strict=True)
                }
                fn = (lambda s, f: lambda: s.run(None, f))(session, feeds)
                out = [torch.from_numpy(a) for a in fn()]
                row.max_abs_diff = max_abs_difference(expected, out)
                if device.type != "cpu":
                    row.note = f"{row.note}; CPU execution provider, inputs on the host".lstrip("; ")
            elif backend == "tensorrt":
                from fastvision.deploy import compile_tensorrt

                begin = time.perf_counter()
                engine = _no_grad(compile_tensorrt(module, inputs))
                row.setup_s = time.perf_counter() - begin
                fn = (lambda f: lambda: f(*inputs))(engine)
                row.max_abs_diff = max_abs_difference(expected, tensor_leaves(fn()))
            else:
                raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
            allowed = OUTPUT_TOLERANCE * scale
            if not row.max_abs_diff <= allowed:  # a wrong backend is reported, never timed
                difference = f"{row.max_abs_diff:.3g} (> {allowed:.3g})"
                row.ok, row.error = False, f"output differs from eager by {difference}"
                continue
            fns[backend] = fn
        except Exception as exc:  # noqa: BLE001  (reported in the row; the other backends still run)
            row.ok, row.error = False, _message(exc)
    errors: dict[str, str] = {}
    samples = interleaved_samples_ms(fns, device, budget_s=budget_s * len(fns), errors=errors)
    for backend, message in errors.items():
        rows[backend].ok, rows[backend].error = False, message
    for backend, times in samples.items():
        row = rows[backend]
        stats = spread(times)
        row.median_ms, row.q1_ms, row.q3_ms = stats.median_ms, stats.q1_ms, stats.q3_ms
        row.min_ms, row.max_ms, row.reps = stats.min_ms, stats.max_ms, stats.reps
        row.iqr_pct = 100 * stats.rel_iqr
        row.noisy = stats.noisy(noise_threshold)
        row.samples_per_s = batch / (stats.median_ms * 1e-3) if stats.median_ms > 0 else None
        if "eager" in samples:
            row.vs_eager = paired_ratio(samples["eager"], times)
    return list(rows.values())


def environment(device: torch.device) -> dict[str, Any]:
    """The runner's environment record (versions, revision, threads) with what this benchmark adds."""
    from fastvision.benchmark.runner import environment as runner_environment

    env = runner_environment(device)
    env["onnxruntime"] = module_version("onnxruntime")
    env["onnxruntime_intra_op_threads"] = torch.get_num_threads()
    env["torch_tensorrt"] = module_version("torch_tensorrt")
    env["ratio"] = "vs_eager: median over rounds of eager time / backend time (above 1: faster than eager)"
    return env


def run(
    models: Iterable[str] | None = None,
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    device: torch.device | str = "cpu",
    quick: bool = False,
    budget_s: float | None = None,
    backends: Sequence[str] | None = None,
    noise_threshold: float = NOISE_THRESHOLD,
    threads: int | None = None,
    on_model: Callable[[dict[str, Any], list[InferenceRow]], None] | None = None,
) -> tuple[dict[str, Any], list[InferenceRow]]:
    """Benchmark ``models`` (default: every registered model) at each of ``batches``.

    ``budget_s`` is the timing budget per backend of one model and batch; ``on_model(env, rows)``
    is called after each model (e.g. to save partial results). The 1-minute load average is recorded
    before and after each model (``env["load_avg"]``). ``threads`` sets torch's intra-op threads
    (``torch.set_num_threads``) for the run, and ONNX Runtime's with them.
    """
    from fastvision.models import list_models

    device = torch.device(device)
    models = list(models) if models is not None else list_models()
    backends = tuple(backends) if backends is not None else BACKENDS
    for batch in batches:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch sizes must be positive ints, got {batch!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    budget_s = budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else DEFAULT_BUDGET_S)
    numeric = isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool)
    if not numeric or not 0 < budget_s < float("inf"):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    env = environment(device)
    env.update(budget_s=budget_s, batches=list(batches), noise_threshold_pct=100 * noise_threshold)
    env["load_avg"] = {}
    rows: list[InferenceRow] = []
    for name in models:
        start, begin = load_average(), time.perf_counter()
        rows += bench_model(name, batches, device, budget_s, backends, noise_threshold)
        env["load_avg"][name] = {"start": start, "end": load_average()}
        env.setdefault("model_seconds", {})[name] = round(time.perf_counter() - begin, 1)
        if on_model is not None:
            on_model(env, rows)
    return env, rows


def write_results(path: Path, env: dict[str, Any], rows: list[InferenceRow]) -> None:
    """``path`` (JSON: environment and rows) and the Markdown table beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    path.with_suffix(".md").write_text(format_table(env, rows) + "\n")


def best_backends(rows: list[InferenceRow]) -> list[tuple[str, int, InferenceRow]]:
    """(model, batch, fastest timed row) per model and batch, in the rows' order."""
    groups: dict[tuple[str, int], list[InferenceRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.batch), []).append(row)
    best = []
    for (model, batch), group in groups.items():
        timed = [r for r in group if r.ok and r.median_ms is not None]
        if not timed:
            continue
        best.append((model, batch, min(timed, key=lambda r: r.median_ms)))
    return best


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(env: dict[str, Any], rows: list[InferenceRow]) -> str:
    """Markdown: the environment, the fastest backend per model and batch, then every row."""
    loads = [x for v in env.get("load_avg", {}).values() for x in (v["start"], v["end"]) if x is not None]
    load = f"{min(loads):g} to {max(loads):g}" if loads else "not recorded"
    lines = [
        f"# Inference benchmark ({env.get('device_type')})",
        "",
        f"- device: {env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')} "
        f"({env.get('threads')} threads), onnxruntime {env.get('onnxruntime')} "
        f"({env.get('onnxruntime_intra_op_threads')} intra-op threads), torch-tensorrt "
        f"{env.get('torch_tensorrt') or 'not installed'}",
        f"- revision {env.get('git_revision')}, {env.get('date')}; timing budget {env.get('budget_s')} s per "
        "backend of a model and batch, backends timed round-robin (`fastvision.benchmark.timing`)",
        f"- 1-minute load average while measuring: {load} on {env.get('cpu_count')} CPUs"
        + (" (above the CPU count: other processes competed for the cores)" if loads and env.get("cpu_count")
           and max(loads) > env["cpu_count"] else ""),
        "- latency: median of per-call times, IQR as % of the median (rows marked ~ exceed "
        f"{env.get('noise_threshold_pct', 100 * NOISE_THRESHOLD):g}%); x eager: median over rounds of "
        "eager time / backend time (above 1 is faster); diff: largest |output - eager output|",
        "",
        "## Fastest backend per model and batch",
        "",
        "| model | batch | fastest | ms | samples/s | x eager |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for model, batch, row in best_backends(rows):
        lines.append(
            f"| {model} | {batch} | {row.backend} | {_fmt(row.median_ms, '.3f')} | "
            f"{_fmt(row.samples_per_s, '.1f')} | {_fmt(row.vs_eager, '.2f')} |"
        )
    lines += [
        "",
        "## All rows",
        "",
        "| model | batch | backend | median ms | IQR % | samples/s | x eager | diff | setup s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.ok:
            note = r.note
            iqr = _fmt(r.iqr_pct, ".1f") + (" ~" if r.noisy else "")
        else:
            note, iqr = (r.error or "").replace("|", "/"), "-"
        lines.append(
            f"| {r.model} | {r.batch} | {r.backend} | {_fmt(r.median_ms, '.3f')} | {iqr} | "
            f"{_fmt(r.samples_per_s, '.1f')} | {_fmt(r.vs_eager, '.2f')} | {_fmt(r.max_abs_diff, '.2g')} | "
            f"{_fmt(r.setup_s, '.1f')} | {note} |"
        )
    return "\n".join(lines)


def summary_lines(rows: list[InferenceRow]) -> list[str]:
    """One line per model: the fastest backend at each batch size with its speed-up over eager."""
    per_model: dict[str, list[str]] = {}
    for model, batch, row in best_backends(rows):
        ratio = "" if row.backend == "eager" else f" ({_fmt(row.vs_eager, '.2f')}x eager)"
        per_model.setdefault(model, []).append(f"batch {batch}: {row.backend}{ratio}")
    return [f"{model}: {'; '.join(parts)}" for model, parts in per_model.items()]


__all__ = [
    "BACKENDS",
    "DEFAULT_BATCHES",
    "InferenceRow",
    "bench_model",
    "best_backends",
    "environment",
    "format_table",
    "run",
    "summary_lines",
    "write_results",
]
