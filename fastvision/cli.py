"""The ``fastvision`` command: ``bench`` (the main job), ``bench-inference``, ``profile``, ``info``,
``export``, ``train``, ``evaluate``.

Errors: every command reports a mistake as one line on stderr, ``fastvision COMMAND: error: ...``,
and exits 2 for a bad invocation (the command line must change: an unknown option, model or
value, ``--device cuda`` without CUDA, an output path that is in the way, a run folder that needs
``--resume`` or ``--overwrite``) and 1 for a failure while working (a missing, malformed or damaged
file, an unwritable folder, a full disk, a diverging run, failed checks). A closed output pipe
(``fastvision info --json | head``) ends the command quietly. ``FASTVISION_TRACEBACK=1`` shows the
traceback of a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from fastvision.benchmark.timing import module_version

DESCRIPTION = (
    "fastvision: Triton and CUDA C++ kernels behind PyTorch modules. Commands: bench (the main job: "
    "check every backend against the reference, then time it), bench-inference, profile, info, "
    "export, train, evaluate. Exit status: 0 success, 1 a failure while running, 2 a bad invocation."
)
TRACEBACK_ENV_VAR = "FASTVISION_TRACEBACK"
EXIT_FAILURE, EXIT_USAGE = 1, 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


class UsageError(Exception):
    """The command line cannot be carried out as written: exit status 2, as argparse's own errors."""


# Failures while a command works: reported in one line, exit status 1. Anything else is a bug and
# keeps its traceback.
RUNTIME_ERRORS = (ValueError, OSError, RuntimeError, ImportError, FloatingPointError, MemoryError, EOFError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is what ``--help`` is for."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException, limit: int = 600) -> str:
    """An exception's message as one line: an OSError as 'path: reason', a multi-line message cut to
    its first line, anything longer than ``limit`` characters shortened."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error).strip()
        if isinstance(error, KeyError) and len(error.args) == 1:
            text = f"missing key {error.args[0]!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def registered_model(name: str) -> str:
    """argparse ``type`` of a MODEL argument: an unknown name is a usage error naming the choices."""
    from fastvision.models import get_model_spec

    try:
        get_model_spec(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(one_line(error)) from None
    return name


def check_device(args: argparse.Namespace) -> None:
    """``--device cuda`` on a machine without a visible CUDA device is a usage error."""
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise UsageError(f"--device cuda: no CUDA device is visible ({build}); use --device cpu")


def new_output(path: Path, flag: str, kind: str) -> Path:
    """An output path that is free for a ``kind`` ("file" or "folder"): an existing path of the
    other kind is a usage error naming ``flag``."""
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: an existing file, not a folder; name a folder for the output")
    if kind == "file" and path.is_dir():
        raise UsageError(f"{flag} {path}: an existing folder; name the output file")
    return path


def existing_file(value: str | None, flag: str) -> None:
    """A file the command line names must be there and be a file (not a folder): else a usage error."""
    if value is None:
        return
    if Path(value).is_dir():
        raise UsageError(f"{flag} {value}: a folder; name the file")
    if not Path(value).exists():
        raise UsageError(f"{flag} {value}: no such file")


def existing_folder(value: str | None, flag: str) -> None:
    """A folder the command line names must be there and be a folder: else a usage error."""
    if value is None:
        return
    if not Path(value).exists():
        raise UsageError(f"{flag} {value}: no such folder")
    if not Path(value).is_dir():
        raise UsageError(f"{flag} {value}: a file, not a folder")


def run_folder(*parts: str) -> Path:
    """The default output folder of a command: under ``runs/`` (git-ignored), never a tracked path."""
    return Path("runs", *parts)


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
    from fastvision.profiling.ranges import NVTX_BACKEND

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
            raise UsageError(f"--rebuild: {script} not found (it needs a source checkout)")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        status = subprocess.run([sys.executable, str(script), "--quiet"], env=env).returncode
    path = table.with_suffix(".json") if as_json else table
    if not path.exists():
        raise UsageError(
            f"no kernel budget table at {path}: run fastvision info --kernels --rebuild in a checkout"
        )
    print(path.read_text(), end="")
    return status


def _cmd_info(args: argparse.Namespace) -> int:
    if args.kernels or args.rebuild:
        return _show_kernel_budgets(args.rebuild, args.json)
    from fastvision._compat import version_warning

    warning = version_warning()
    if warning:  # on stderr, so that --json output stays valid JSON
        print(f"fastvision info: warning: {warning}", file=sys.stderr)
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
    print(runner.format_table(env, rows, full=args.full))
    if args.json:
        runner.write_results(Path(args.json), env, rows)
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.csv')}")
    for row in rows:
        if not row.ok:
            print(f"FAILED {row.op} {row.case} {row.impl}: {row.error}", file=sys.stderr)
    return runner.exit_code(rows)


def _cmd_export(args: argparse.Namespace) -> int:
    from fastvision import deploy
    from fastvision.models import create_model, example_inputs, inference_module
    from fastvision.train.distributed import resolve_device

    if args.batch < 1:
        raise UsageError(f"--batch must be a positive int, got {args.batch}")
    existing_file(args.checkpoint, "--checkpoint")
    suffix = {"pt2": ".pt2", "onnx": ".onnx", "tensorrt": ".trt.ep"}[args.format]
    out = Path(args.out) if args.out else run_folder("export", f"{args.model}{suffix}")
    new_output(out, "--out", "file")
    device = resolve_device(args.device)
    model = create_model(args.model).to(device)
    inputs = example_inputs(args.model, args.batch, device=device)
    if args.checkpoint:
        from fastvision.train.trainer import init_weights

        print(f"weights: {init_weights(model, args.checkpoint, device)}")
    else:
        print(
            "weights: random initialisation (no --checkpoint given): the export has the model's structure "
            "and speed, not trained outputs"
        )
    module = inference_module(model, args.model)
    try:
        path = deploy.export(module, inputs, args.format, out, dynamic_batch=args.dynamic_batch)
    except (ImportError, NotImplementedError, RuntimeError, ValueError) as error:
        raise RuntimeError(f"{args.model} to {args.format}: {one_line(error)}") from error
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.format == "tensorrt" and device.type != "cuda":
        return 0
    with torch.no_grad():
        expected = module(*inputs)
        difference = deploy.max_abs_difference(expected, deploy.run_exported(path, args.format, inputs))
    print(f"max |exported - eager| on the example inputs (batch {args.batch}): {difference:.3g}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from fastvision.profiling.model import profile_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = new_output(Path(args.out) if args.out else run_folder("profile", args.model), "--out", "folder")
    counts = (("--steps", args.steps, 1), ("--inference-steps", args.inference_steps, 0),
              ("--warmup", args.warmup, 0), ("--batch", args.batch, 1), ("--top", args.top, 1))  # fmt: skip
    for flag, value, least in counts:
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
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
    print((out / "summary.md").read_text(), end="")
    written = ["summary.md", "summary.json"] + ([summary["trace"]] if summary["trace"] else [])
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from fastvision.benchmark import inference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    import fastvision
    from fastvision.benchmark.runner import op_names
    from fastvision.benchmark.timing import NOISE_THRESHOLD

    parser = Parser(prog="fastvision", description=DESCRIPTION)
    version = f"fastvision {fastvision.__version__} (torch {torch.__version__})"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="check every backend against the reference, then time it")
    bench.add_argument(
        "--op", action="append", choices=op_names(), help="op to run (repeatable; default all)"
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, short timing budget")
    bench.add_argument(
        "--full",
        action="store_true",
        help="print every implementation of every case (times, spread, bandwidth, predictions); "
        "--json/--csv always hold the full table",
    )
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
    export.add_argument(
        "model", type=registered_model, help="registered model name (fastvision info lists them)"
    )
    export.add_argument("--format", choices=FORMATS, default="pt2")
    export.add_argument("--checkpoint", metavar="PATH", help="weights from a training run (EMA when present)")
    export.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (default 1)")
    export.add_argument(
        "--dynamic-batch", action="store_true", help="export the batch dimension as a symbolic size"
    )
    export.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    export.add_argument(
        "--out", metavar="PATH", help="output file (default: runs/export/MODEL.pt2, .onnx or .trt.ep)"
    )
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
    profile.add_argument(
        "model", type=registered_model, help="registered model name (fastvision info lists them)"
    )
    profile.add_argument("--steps", type=int, default=3, help="profiled training steps (default 3)")
    profile.add_argument(
        "--inference-steps", type=int, help="profiled inference steps (default: as many as --steps)"
    )
    profile.add_argument(
        "--warmup", type=int, default=1, help="unprofiled steps of each kind first (default 1)"
    )
    profile.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    profile.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    profile.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: runs/profile/MODEL; the committed summaries are written only with "
        "--out profiles/MODEL, see profiles/README.md)",
    )
    profile.add_argument("--top", type=int, default=30, help="rows of the op table (default 30)")
    profile.add_argument("--no-trace", action="store_true", help="skip the Chrome trace")
    profile.set_defaults(handler=_cmd_profile)

    from fastvision.train.cli import add_subcommands

    add_subcommands(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command and turn what it raises into one stderr line and the exit status."""
    prefix = f"fastvision {args.command}: error:"
    try:
        check_device(args)
        return int(args.handler(args) or 0)
    except BrokenPipeError:
        raise  # handled by main: the reader went away, nothing to report
    except UsageError as error:
        print(f"{prefix} {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except RUNTIME_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV_VAR):
            raise
        print(f"{prefix} {one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"fastvision {args.command}: interrupted", file=sys.stderr)
        return 130


class _DropNoCudaRuntimeNotice(logging.Filter):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." whenever it is
    imported (torch.compile does) on a machine with the CUDA toolkit but no GPU: a notice about
    building extensions, which no command here does, printed in the middle of their output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def main(argv: list[str] | None = None) -> int:
    import fastvision.models  # noqa: F401  (registers the architectures)

    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntimeNotice())

    try:
        parser = build_parser()
        try:
            args, extras = parser.parse_known_args(argv)
            if extras:  # reported by the sub-command's parser, so the line names the command
                commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
        except SystemExit as exit_:  # argparse's errors (2), --help and --version (0): a status to return
            sys.stdout.flush()
            return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        code = run_command(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): end quietly; point stdout at /dev/null so that
        # the interpreter's final flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
