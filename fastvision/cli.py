"""The ``fastvision`` command: ``bench`` (the main job), ``bench-inference``, ``profile``, ``info``,
``export``, ``train``, ``evaluate``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from fastvision.benchmark.timing import module_version

OPTIONAL_EXTRAS = {
    "triton": "triton",
    "liger-kernel": "liger_kernel",
    "nvtx": "nvtx",
    "warpconvnet": "warpconvnet",
    "mamba-ssm": "mamba_ssm",
    "causal-conv1d": "causal_conv1d",
    "torch-tensorrt": "torch_tensorrt",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "schedulefree": "schedulefree",
}


def info() -> dict:
    import fastvision
    from fastvision._backend import cuda_kernels_built, triton_interpreting
    from fastvision._extension import EXTENSION_ERROR, extension_loaded
    from fastvision.models import list_models
    from fastvision.profiling import NVTX_BACKEND

    return {
        "fastvision": fastvision.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.machine()})",
        "extension": "built" if extension_loaded() else f"not built ({EXTENSION_ERROR})",
        "cuda_kernels_built": cuda_kernels_built(),
        "triton_interpreter": triton_interpreting(),
        "backends_available": fastvision.available_backends(),
        "forced_backend": fastvision.forced_backend(),
        "nvtx": NVTX_BACKEND,
        "optional": {name: module_version(module) for name, module in OPTIONAL_EXTRAS.items()},
        "models": list_models(),
        "ops": _ops_table(),
    }


def _ops_table() -> dict:
    """Each op's backends on the default device: "ok", or why it cannot run here."""
    from fastvision._backend import why_unusable
    from fastvision.ops import OPS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = {}
    for name, spec in OPS.items():
        order = spec.gpu_order if device.type == "cuda" else spec.cpu_order
        table[name] = {
            "backends": {b: why_unusable(b, device) or spec.built(b) or "ok" for b in spec.backends},
            "automatic_order": [*order, "reference"],
        }
    return table


def _kernel_budget_paths() -> tuple[Path, Path]:
    """(the budget script, its committed table) in the source checkout this package runs from."""
    import fastvision

    root = Path(fastvision.__file__).resolve().parents[1]
    return root / "bench" / "kernel_budget.py", root / "bench" / "results" / "kernel_budget.md"


def _show_kernel_budgets(rebuild: bool, as_json: bool) -> int:
    import os
    import subprocess

    script, table = _kernel_budget_paths()
    status = 0
    if rebuild:
        if not script.exists():
            print(f"fastvision info --kernels --rebuild: {script} not found (needs a source checkout)")
            return 2
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        status = subprocess.run([sys.executable, str(script), "--quiet"], env=env).returncode
    path = table.with_suffix(".json") if as_json else table
    if not path.exists():
        print(f"no kernel budget table at {path}: run `fastvision info --kernels --rebuild` in a checkout")
        return 2
    print(path.read_text(), end="")
    return status


def _cmd_info(args: argparse.Namespace) -> int:
    if args.kernels or args.rebuild:
        return _show_kernel_budgets(args.rebuild, args.json)
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {'missing' if v is None else v}")
        else:
            print(f"{key}: {value}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastvision.benchmark import runner

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastvision bench: --device cuda asked for, but no CUDA device is visible", file=sys.stderr)
        return 2
    ops = runner.op_names() if not args.op else args.op

    def save_partial(env: dict, rows: list) -> None:
        # Written after every case: a run cut short keeps what it measured.
        runner.write_results(Path(args.json), env, rows)

    env, rows = runner.run(
        ops,
        device,
        quick=args.quick,
        budget_s=args.budget,
        noise_threshold=args.noise_threshold / 100,
        on_case=save_partial if args.json else None,
    )
    print(runner.format_table(env, rows))
    if args.json:
        runner.write_results(Path(args.json), env, rows)
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.csv')}")
    failed = [r for r in rows if not r.ok]
    for row in failed:
        print(f"FAILED {row.op} {row.case} {row.impl}: {row.error}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fastvision import deploy
    from fastvision.models import create_model, example_inputs, get_model_spec, inference_module
    from fastvision.train.distributed import resolve_device

    try:
        get_model_spec(args.model)
    except ValueError as error:
        print(f"fastvision export: {error}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model = create_model(args.model).to(device)
    try:
        inputs = example_inputs(args.model, args.batch, device=device)
        if args.checkpoint:
            from fastvision.train.checkpoint import CheckpointError
            from fastvision.train.trainer import init_weights

            try:
                print(f"weights: {init_weights(model, args.checkpoint, device)}")
            except (CheckpointError, OSError) as error:
                raise ValueError(f"--checkpoint {args.checkpoint}: {error}") from None
    except ValueError as error:
        print(f"fastvision export: {error}", file=sys.stderr)
        return 2
    module = inference_module(model, args.model)
    suffix = {"pt2": ".pt2", "onnx": ".onnx", "tensorrt": ".trt.ep"}[args.format]
    out = Path(args.out or f"exports/{args.model}{suffix}")
    try:
        path = deploy.export(module, inputs, args.format, out, dynamic_batch=args.dynamic_batch)
    except (ImportError, NotImplementedError, RuntimeError, ValueError) as error:
        print(f"fastvision export: {args.model} to {args.format}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.format == "tensorrt" and device.type != "cuda":
        return 0
    with torch.no_grad():
        expected = module(*inputs)
        difference = deploy.max_abs_difference(expected, deploy.run_exported(path, args.format, inputs))
    print(f"max |exported - eager| on the example inputs (batch {args.batch}): {difference:.3g}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from fastvision.profiling import profile_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or f"profiles/{args.model}")
    try:
        summary = profile_model(
            args.model,
            steps=args.steps,
            inference_steps=args.inference_steps,
            batch=args.batch,
            warmup=args.warmup,
            device=device,
            out=out,
            top=args.top,
            trace=not args.no_trace,
        )
    except (RuntimeError, ValueError) as error:
        print(f"fastvision profile {args.model}: {error}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text(), end="")
    written = ["summary.md", "summary.json"] + ([summary["trace"]] if summary["trace"] else [])
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from fastvision.benchmark import inference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        message = "fastvision bench-inference: --device cuda asked for, but no CUDA device is visible"
        print(message, file=sys.stderr)
        return 2
    json_path = Path(args.json) if args.json else None

    def save_partial(env: dict, rows: list) -> None:
        # Written after every model: a run cut short keeps what it measured.
        inference.write_results(json_path, env, rows)

    env, rows = inference.run(
        args.model or None,
        batches=args.batch or list(inference.DEFAULT_BATCHES),
        device=device,
        quick=args.quick,
        budget_s=args.budget,
        backends=args.backend or None,
        threads=args.threads,
        on_model=save_partial if json_path else None,
    )
    print(inference.format_table(env, rows))
    if json_path:
        inference.write_results(json_path, env, rows)
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastvision.benchmark.runner import op_names
    from fastvision.benchmark.timing import NOISE_THRESHOLD

    parser = argparse.ArgumentParser(prog="fastvision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="check every backend against the reference, then time it")
    bench.add_argument(
        "--op", action="append", choices=op_names(), help="op to run (repeatable; default all)"
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, short timing budget")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    bench.add_argument(
        "--json", metavar="PATH", help="also write results as JSON (and CSV beside it), after every case"
    )
    bench.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="timing budget per implementation of a case (default 0.3 with --quick, else 1.0)",
    )
    bench.add_argument(
        "--noise-threshold",
        type=float,
        default=100 * NOISE_THRESHOLD,
        metavar="PERCENT",
        help="mark a row noisy when its interquartile range passes this share of its median (default 10)",
    )
    bench.set_defaults(handler=_cmd_bench)

    info_parser = sub.add_parser("info", help="versions, device, backends built, optional extras")
    info_parser.add_argument("--json", action="store_true")
    info_parser.add_argument(
        "--kernels",
        action="store_true",
        help="print the committed sm_90 kernel budget table (registers, spills, shared memory per kernel "
        "and launch configuration; bench/results/kernel_budget.md, or .json with --json)",
    )
    info_parser.add_argument(
        "--rebuild",
        action="store_true",
        help="with --kernels: regenerate the table first (bench/kernel_budget.py: compiles for sm_90)",
    )
    info_parser.set_defaults(handler=_cmd_info)

    from fastvision.deploy import FORMATS

    export = sub.add_parser(
        "export",
        help="write a registered model's inference entry as pt2, ONNX or TensorRT, checked against eager",
    )
    export.add_argument("model", help="registered model name (fastvision info lists them)")
    export.add_argument("--format", choices=FORMATS, default="pt2")
    export.add_argument("--checkpoint", metavar="PATH", help="weights from a training run (EMA when present)")
    export.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (default 1)")
    export.add_argument(
        "--dynamic-batch", action="store_true", help="export the batch dimension as a symbolic size"
    )
    export.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    export.add_argument("--out", metavar="PATH", help="default: exports/MODEL.{pt2,onnx,trt.ep}")
    export.set_defaults(handler=_cmd_export)

    from fastvision.benchmark.inference import BACKENDS, DEFAULT_BATCHES
    from fastvision.models import list_models

    bench_inference = sub.add_parser(
        "bench-inference",
        help="per model: eager vs torch.compile vs ONNX Runtime vs TensorRT, latency and throughput",
    )
    bench_inference.add_argument(
        "--model", action="append", choices=list_models(), help="model to run (repeatable; default all)"
    )
    bench_inference.add_argument(
        "--batch",
        action="append",
        type=int,
        help=f"batch size (repeatable; default {' and '.join(map(str, DEFAULT_BATCHES))})",
    )
    bench_inference.add_argument(
        "--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu"
    )
    bench_inference.add_argument(
        "--backend", action="append", choices=BACKENDS, help="backend to run (repeatable; default all)"
    )
    bench_inference.add_argument(
        "--json", metavar="PATH", help="also write results as JSON (and Markdown beside it) after every model"
    )
    bench_inference.add_argument("--quick", action="store_true", help="short timing budget")
    bench_inference.add_argument(
        "--threads", type=int, help="torch (and ONNX Runtime) intra-op threads (default: torch's default)"
    )
    bench_inference.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="timing budget per backend of a model and batch (default 0.25 with --quick, else 1.5)",
    )
    bench_inference.set_defaults(handler=_cmd_bench_inference)

    profile = sub.add_parser(
        "profile",
        help="torch.profiler (and NVTX) over a few training and inference steps: Chrome trace and op table",
    )
    profile.add_argument("model", help="registered model name (fastvision info lists them)")
    profile.add_argument("--steps", type=int, default=3, help="profiled training steps (default 3)")
    profile.add_argument(
        "--inference-steps", type=int, help="profiled inference steps (default: as many as --steps)"
    )
    profile.add_argument(
        "--warmup", type=int, default=1, help="unprofiled steps of each kind first (default 1)"
    )
    profile.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    profile.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    profile.add_argument("--out", metavar="DIR", help="default: profiles/MODEL")
    profile.add_argument("--top", type=int, default=30, help="rows of the op table (default 30)")
    profile.add_argument("--no-trace", action="store_true", help="skip the Chrome trace")
    profile.set_defaults(handler=_cmd_profile)

    from fastvision.train.cli import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import fastvision.models  # noqa: F401  (registers the architectures)

    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
