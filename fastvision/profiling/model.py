"""``profile_model(name)`` (``fastvision profile MODEL``): torch.profiler over a few training and
inference steps of a registered model.

It runs a few training steps (forward, the model's task loss on a synthetic batch, backward,
optimizer step) and a few inference steps after warm-up under ``torch.profiler`` and writes a
Chrome trace and a per-op summary (``summary.md``, ``summary.json``). Each fastvision op call runs
inside a ``fastvision.op.<name>`` range and records the cost of its arguments (``OpSpec.cost``:
bytes and FLOPs of one forward call), so the summary gives per op its calls, time, bytes, FLOPs,
GB/s and GFLOP/s. Module forwards appear through their NVTX ranges
(``fastvision.profiling.ranges``), which record into the profile while it runs. On CUDA the same
steps then run once more under ``torch.autograd.profiler.emit_nvtx`` so that Nsight Systems sees
every aten op as an NVTX range.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastvision.profiling.ranges import NVTX_BACKEND, nvtx_range, recording_functions

# --------------------------------------------------------------------------------------------------
# profile_model: torch.profiler over a few training and inference steps of a registered model

TRACE_GZIP_BYTES = 16 * 2**20  # a Chrome trace larger than this is written as trace.json.gz
SURROGATE_LOSS = "surrogate: sum of the squared outputs of the inference entry (the task needs real data)"
COST_NOTE = (
    "Forward calls of each fastvision op (autograd's backward kernels run outside its range and show "
    "above by name, time only): bytes and FLOPs are its cost model (OpSpec.cost, the minimal DRAM "
    "traffic and useful FLOPs of one call) summed over the calls' arguments; time is the inclusive "
    "time of its `fastvision.op.<name>` range"
)
CPU_COST_NOTE = (
    "On the CPU most ops run their plain-PyTorch reference (several aten ops, intermediates in memory), "
    "so GB/s and GFLOP/s here measure that reference against the kernels' traffic floor: they say little "
    "about the GPU kernels"
)
_PHASES = ("fastvision.profile.train_step", "fastvision.profile.inference_step")
_OP_RANGE = "fastvision.op."
_COST_RANGE = "fastvision.op_cost"


def synthetic_batch(
    name: str, batch: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[tuple[torch.Tensor, ...] | None, str]:
    """A training batch for model ``name``'s task made without data files, and what it is.

    ``(None, reason)`` when the task has no synthetic batch (the caller then uses a surrogate loss).
    """
    from fastvision.models import example_inputs, get_model_spec

    spec = get_model_spec(name)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = example_inputs(name, batch, seed=seed)
    if spec.task == "classification":
        labels = torch.randint(0, 10, (batch,), generator=generator)
        made, what = (inputs[0], labels), "example images, random labels of 10 classes"
    elif spec.task == "digit_sequence":
        digits = torch.randint(0, 10, (batch, 4), generator=generator)
        made, what = (inputs[0], digits), "example images, random 4-digit targets"
    elif spec.task in ("denoise", "inr"):
        made, what = (inputs[0],), "example images as the clean targets"
    elif spec.task == "detector_regression":
        from fastvision.data.detector import Detector

        detector = Detector()
        events = detector.simulate(batch, seed=seed)
        live = detector.live.unsqueeze(0).expand(batch, -1).contiguous()
        made, what = (events.observed, events.params, live), "simulated detector events"
    else:
        return None, f"task {spec.task!r} has no synthetic batch"
    return tuple(t.to(device) for t in made), what


def profile_model(
    name: str,
    *,
    steps: int = 3,
    inference_steps: int | None = None,
    batch: int = 2,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    top: int = 30,
    trace: bool = True,
) -> dict:
    """Profile ``steps`` training steps and ``inference_steps`` (default ``steps``) inference steps of
    registered model ``name`` after ``warmup`` of each, and write ``trace.json`` (or ``.json.gz``),
    ``summary.json`` and ``summary.md`` into ``out`` (default ``runs/profile/<name>``). Returns the summary.

    A training step is forward + the model's task loss on :func:`synthetic_batch` (a surrogate loss
    where the task has none) + backward + the step of the optimizer its training config names; an
    inference step is ``inference_module(model, name)(*example_inputs(name, batch))`` without grad.
    """
    import time

    from fastvision.benchmark.runner import environment
    from fastvision.benchmark.timing import load_average, synchronize
    from fastvision.deploy import tensor_leaves
    from fastvision.models import create_model, example_inputs, get_model_spec, inference_module
    from fastvision.train.optim import build_optimizer, is_schedule_free
    from fastvision.train.tasks import get_task
    from fastvision.train.trainer import resolve_config

    spec = get_model_spec(name)  # an unknown model fails before anything is written
    inference_steps = steps if inference_steps is None else inference_steps
    checks = (("steps", steps, 1), ("inference_steps", inference_steps, 0), ("batch", batch, 1),
              ("warmup", warmup, 0), ("top", top, 1))  # fmt: skip
    for label, value, least in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{label} must be an int >= {least}, got {value!r}")
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile_model: device cuda asked for, but no CUDA device is visible")
    out = Path(out) if out is not None else Path("runs") / "profile" / name  # never the committed profiles/
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = create_model(name).to(device)
    cfg = resolve_config(name)
    optimizer = build_optimizer(model, cfg)
    train_batch, batch_what = synthetic_batch(name, batch, device)
    inputs = example_inputs(name, batch, device=device)
    module = inference_module(model, name)
    if train_batch is not None:
        task = get_task(spec.task)
        loss_what = f"task {spec.task!r} loss on {batch_what}"

        def loss_fn() -> torch.Tensor:
            return task.train_step(model, train_batch, cfg).loss
    else:
        loss_what = f"{SURROGATE_LOSS} ({batch_what})"

        def loss_fn() -> torch.Tensor:
            outputs = [t for t in tensor_leaves(module(*inputs)) if t.is_floating_point()]
            return sum(t.float().square().sum() for t in outputs)

    def train_steps(n: int) -> None:
        model.train()
        if is_schedule_free(optimizer):
            optimizer.train()
        for _ in range(n):
            with nvtx_range(_PHASES[0]):
                optimizer.zero_grad(set_to_none=True)
                loss_fn().backward()
                optimizer.step()
        synchronize(device)

    def inference(n: int) -> None:
        model.eval()
        with torch.no_grad():
            for _ in range(n):
                with nvtx_range(_PHASES[1]):
                    module(*inputs)
        synchronize(device)

    train_steps(warmup)
    inference(warmup)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    quiet_kineto_without_gpu()
    load_start = load_average()
    wall_ms: dict[str, float] = {}
    from fastvision.ops._contract import record_op_costs

    with (
        recording_functions(),
        record_op_costs() as op_costs,
        torch.profiler.profile(activities=activities) as prof,
    ):
        for phase, run, n in ((_PHASES[0], train_steps, steps), (_PHASES[1], inference, inference_steps)):
            begin = time.perf_counter()
            run(n)
            wall_ms[phase] = (time.perf_counter() - begin) * 1e3 / max(n, 1)
    if device.type == "cuda":
        # A pass for Nsight Systems: every aten op as an NVTX range (emit_nvtx cannot share the run
        # with torch.profiler: both are autograd profilers).
        with nvtx_range("fastvision.profile.emit_nvtx"), torch.autograd.profiler.emit_nvtx():
            train_steps(steps)
            inference(inference_steps)
    load_end = load_average()

    trace_path = None
    if trace:
        trace_path = _write_trace(prof, out / "trace.json")
    summary = _summarize(prof, device, top)
    summary["op_costs"] = _op_costs(prof, op_costs, device, summary["total_self_ms"])
    summary.update(
        model=name,
        task=spec.task,
        loss=loss_what,
        optimizer=type(optimizer).__name__,
        device=device.type,
        batch=batch,
        steps=steps,
        inference_steps=inference_steps,
        warmup=warmup,
        inference_entry=spec.inference,
        dtype="float32 (no autocast)",
        parameters=sum(p.numel() for p in model.parameters()),
        wall_ms_per_step_under_profiler={
            "train": round(wall_ms[_PHASES[0]], 3),
            "inference": round(wall_ms[_PHASES[1]], 3),
        },
        nvtx_backend=NVTX_BACKEND,
        emit_nvtx_pass=device.type == "cuda",
        trace=None if trace_path is None else trace_path.name,
        trace_bytes=None if trace_path is None else trace_path.stat().st_size,
        cost_note=COST_NOTE if device.type == "cuda" else f"{COST_NOTE}. {CPU_COST_NOTE}",
        environment={**environment(device), "load_avg_start": load_start, "load_avg_end": load_end},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(format_summary(summary))
    return summary


KINETO_LOG_ENV_VAR = "KINETO_LOG_LEVEL"
KINETO_SILENT = "6"  # above every level kineto logs at (ERROR is 4, its USDT start/stop marks 5)


def quiet_kineto_without_gpu() -> None:
    """On a machine without a CUDA device, silence the profiler library's (kineto's) log lines.

    A CUDA build of torch without a GPU makes kineto print ``ERROR: ... gpuGetDeviceCount failed
    with code 35`` (no driver) and two ``profiler_start``/``profiler_stop`` marks on every CPU
    profile: they concern only its GPU tracer, which a CPU profile does not use. Set before the first
    profile starts; a ``KINETO_LOG_LEVEL`` the user chose is kept, and with a GPU nothing changes.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault(KINETO_LOG_ENV_VAR, KINETO_SILENT)


def _write_trace(prof: torch.profiler.profile, path: Path) -> Path:
    import gzip
    import shutil

    for stale in (path, path.with_name(path.name + ".gz")):
        stale.unlink(missing_ok=True)
    prof.export_chrome_trace(str(path))
    if path.stat().st_size <= TRACE_GZIP_BYTES:
        return path
    packed = path.with_name(path.name + ".gz")
    with path.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return packed


def _device_time_us(event: object, prefix: str) -> float:
    """``<prefix>device_time_total`` of a profiler event (``<prefix>cuda_time_total`` on older torch)."""
    for attribute in (f"{prefix}device_time_total", f"{prefix}cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0


def _device_self_us(event: object) -> float:
    return _device_time_us(event, "self_")


def _device_total_us(event: object) -> float:
    return _device_time_us(event, "")


def _op_costs(prof: torch.profiler.profile, records: list, device: torch.device, total_ms: float) -> dict:
    """Per fastvision op: forward calls, inclusive time of its ``fastvision.op.<name>`` ranges (device
    time on CUDA, CPU time otherwise), the recorded bytes and FLOPs summed, GB/s and GFLOP/s."""
    on_device = device.type == "cuda"
    totals: dict[str, list] = {}  # name -> [calls, bytes, flops, every call has a cost]
    for name, cost in records:
        entry = totals.setdefault(name, [0, 0, 0, True])
        entry[0] += 1
        if cost is None:
            entry[3] = False
        else:
            entry[1] += cost.bytes_moved
            entry[2] += cost.flops
    range_us: dict[str, float] = {}
    cost_us = 0.0
    for e in prof.key_averages():
        if on_device and str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # the GPU-side copy of a user range: its CPU-side event carries its kernels' time
        if e.key.startswith(_OP_RANGE):
            name = e.key.removeprefix(_OP_RANGE)
            us = _device_total_us(e) if on_device else float(e.cpu_time_total)
            range_us[name] = range_us.get(name, 0.0) + us
        elif e.key == _COST_RANGE:
            cost_us += float(e.cpu_time_total)
    rows = []
    for name, (calls, moved, flops, known) in totals.items():
        us = range_us.get(name)
        seconds = us / 1e6 if us else None
        rows.append(
            {
                "name": name,
                "calls": calls,
                "time_ms": None if us is None else round(us / 1e3, 3),
                "share_pct": round(100 * us / 1e3 / total_ms, 2) if us is not None and total_ms else None,
                "bytes": moved if known else None,
                "flops": flops if known else None,
                "gbps": round(moved / seconds / 1e9, 3) if known and seconds and moved else None,
                "gflops": round(flops / seconds / 1e9, 3) if known and seconds and flops else None,
            }
        )
    rows.sort(key=lambda row: row["time_ms"] or 0.0, reverse=True)
    where = "device" if on_device else "CPU"
    return {
        "time_basis": f"inclusive {where} time of the op's range",
        "cost_cpu_ms": round(cost_us / 1e3, 3),
        "ops": rows,
    }


def _share(part_us: float, total_us: float) -> float | None:
    return round(100 * part_us / total_us, 2) if total_us else None


def _summarize(prof: torch.profiler.profile, device: torch.device, top: int) -> dict:
    """Per-op rows sorted by self time (device time on CUDA), module ranges, and the two phases."""
    events = list(prof.key_averages())
    on_device = device.type == "cuda"

    def self_us(e: object) -> float:
        return _device_self_us(e) if on_device else float(e.self_cpu_time_total)

    total_self_us = sum(self_us(e) for e in events)
    total_cpu_self_us = sum(e.self_cpu_time_total for e in events)  # the basis of module shares
    ranges = [
        e for e in events
        if e.key.startswith("fastvision.") and not e.key.startswith(_OP_RANGE) and e.key != _COST_RANGE
    ]  # fmt: skip
    ops = sorted((e for e in events if not e.key.startswith("fastvision.")), key=self_us, reverse=True)
    rows = []
    for e in ops[:top]:
        rows.append(
            {
                "name": e.key,
                "calls": int(e.count),
                "self_ms": round(self_us(e) / 1e3, 3),
                "share_pct": round(100 * self_us(e) / total_self_us, 2) if total_self_us else None,
                "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
                "self_device_ms": round(_device_self_us(e) / 1e3, 3) if on_device else None,
                "fastvision_op": "fastvision::" in e.key,
            }
        )
    fastvision_ops = [e for e in ops if "fastvision::" in e.key]
    modules = sorted(
        (e for e in ranges if e.key not in _PHASES), key=lambda e: e.cpu_time_total, reverse=True
    )
    phases = {
        e.key.removeprefix("fastvision.profile."): {
            "calls": int(e.count),
            "cpu_ms_per_call": round(e.cpu_time_total / 1e3 / max(e.count, 1), 3),
        }
        for e in ranges
        if e.key in _PHASES
    }
    return {
        "time_basis": "self device (kernel) time" if on_device else "self CPU time",
        "total_self_ms": round(total_self_us / 1e3, 3),
        "phases": phases,
        "ops": rows,
        "fastvision_ops": [
            {
                "name": e.key,
                "calls": int(e.count),
                "self_ms": round(self_us(e) / 1e3, 3),
                "share_pct": round(100 * self_us(e) / total_self_us, 2) if total_self_us else None,
            }
            for e in fastvision_ops
        ],
        "modules": [
            {
                "name": e.key,
                "calls": int(e.count),
                "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
                "share_pct": _share(e.cpu_time_total, total_cpu_self_us),
            }
            for e in modules[:top]
        ],
    }


def format_summary(summary: dict) -> str:
    """``summary.md``: the header facts, the per-op table, fastvision ops, module ranges."""
    env = summary["environment"]
    wall = summary["wall_ms_per_step_under_profiler"]
    lines = [
        f"# `{summary['model']}`: torch.profiler summary ({summary['device']})",
        "",
        f"- device: {env.get('device')} ({summary['device']}), torch {env.get('torch')}, "
        f"{env.get('threads')} threads, revision {env.get('git_revision')}, {env.get('date')}",
        f"- load average (1 min) {env.get('load_avg_start')} at start, {env.get('load_avg_end')} at end, "
        f"on {env.get('cpu_count')} CPUs (a shared machine: other work may have run beside the profile)",
        f"- {summary['parameters']:,} parameters, batch {summary['batch']}, {summary['dtype']}",
        f"- training: {summary['steps']} steps after {summary['warmup']} warm-up; loss: {summary['loss']}; "
        f"optimizer {summary['optimizer']}",
        f"- inference: {summary['inference_steps']} steps of `{summary['inference_entry']}` on "
        f"`example_inputs` after {summary['warmup']} warm-up, no grad",
        f"- wall time per step under the profiler: train {wall['train']:.1f} ms, "
        f"inference {wall['inference']:.1f} ms (profiler overhead included)",
        f"- table basis: {summary['time_basis']}; total {summary['total_self_ms']:.1f} ms over both phases",
        "",
        "## Top ops by self time",
        "",
        "| op | calls | self ms | share % | CPU total ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["ops"]:
        name = row["name"].replace("|", "\\|")
        name = f"**{name}**" if row["fastvision_op"] else name
        lines.append(
            f"| {name} | {row['calls']} | {row['self_ms']:.3f} | {_pct(row['share_pct'])} | "
            f"{row['cpu_total_ms']:.3f} |"
        )
    lines += _format_op_costs(summary)
    lines += ["", "## fastvision kernels (`fastvision::` custom ops, forward and backward; time only)", ""]
    if summary["fastvision_ops"]:
        lines += ["| op | calls | self ms | share % |", "|---|---:|---:|---:|"]
        for row in summary["fastvision_ops"]:
            share = _pct(row["share_pct"])
            lines.append(f"| {row['name']} | {row['calls']} | {row['self_ms']:.3f} | {share} |")
    else:
        lines.append(
            "No `fastvision::` op appears in this profile: on this device the ops the model uses ran "
            "their plain-PyTorch reference (aten ops)."
        )
    lines += ["", "## Module ranges (NVTX names, inclusive CPU time)", ""]
    if summary["modules"]:
        lines += ["| range | calls | CPU total ms | share % |", "|---|---:|---:|---:|"]
        for row in summary["modules"]:
            lines.append(
                f"| {row['name']} | {row['calls']} | {row['cpu_total_ms']:.3f} | {_pct(row['share_pct'])} |"
            )
    else:
        lines.append("No module of this model marks its forward with `nvtx_range`.")
    lines.append("")
    return "\n".join(lines)


def _format_op_costs(summary: dict) -> list[str]:
    costs = summary.get("op_costs")
    lines = ["", "## fastvision ops: forward calls, bytes, FLOPs, achieved GB/s and GFLOP/s", ""]
    if not costs or not costs["ops"]:
        return [*lines, "No fastvision op ran in this profile."]
    lines += [
        f"Time basis: {costs['time_basis']}. {summary['cost_note']}. Computing the costs took "
        f"{costs['cost_cpu_ms']:.1f} ms of CPU time (`fastvision.op_cost` ranges; their aten ops are in the "
        "tables above).",
        "",
        "| op | calls | time ms | share % | MB moved | MFLOP | GB/s | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in costs["ops"]:
        cells = [
            _num(row["time_ms"], ".3f"),
            _pct(row["share_pct"]),
            _num(None if row["bytes"] is None else row["bytes"] / 1e6, ".3f"),
            _num(None if row["flops"] is None else row["flops"] / 1e6, ".3f"),
            _num(row["gbps"], ".3f"),
            _num(row["gflops"], ".3f"),
        ]
        lines.append(f"| {row['name']} | {row['calls']} | " + " | ".join(cells) + " |")
    lines += ["", "A `-`: no FLOPs to count (the op only moves data), or no time measured."]
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
