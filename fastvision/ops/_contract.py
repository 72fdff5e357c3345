"""The op contract: one declarative :class:`OpSpec` per op, turned into the public op by :func:`define_op`.

An op is its plain-PyTorch reference plus any number of kernel backends. A kernel backend is a
pair of ``torch.library`` ops, ``forward`` and ``backward``, that share one :class:`AutogradRule`:
fake kernels (so ``torch.compile`` and ``torch.export`` see one opaque node), the autograd glue
from the forward to the backward op, and ``backward_reference``, a plain-PyTorch function with the
backward op's signature. The contract registers all of it, once, for every backend:

* first-order gradients run the backend's backward op;
* higher-order gradients (double backward, Hessian-vector products) differentiate
  ``backward_reference``, registered as the backward op's own autograd rule, so they are exact
  rather than silent zeros;
* forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) and ``torch.func``
  transforms (``vmap``, ``jacrev``, ``hessian``) run the reference, which supports them all.

Dispatch goes through each backend's ``supports(...)``: a forced backend that cannot take the
input raises :class:`~fastvision.BackendUnavailableError` naming the limit; automatic choice moves
on to the next backend in the op's GPU or CPU order, ending at the reference. No backend ever
changes the op's semantics.

``OPS`` (``fastvision.ops.OPS``) lists every declared op; the tests, benchmarks, ONNX table,
``fastvision info`` and the kernel-budget check read it.

Each op declares its cost model once, ``OpSpec.cost(*checked) -> OpCost``: the minimal DRAM bytes
and the useful FLOPs of one forward call. The benchmark cases take their bytes and FLOPs from it, and
the profiler records it per call inside :func:`record_op_costs` (off by default: outside it an op call
reads one module-level flag, which torch.compile folds away).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastvision._backend import BACKENDS, PEER_BACKENDS, BackendUnavailableError, forced_backend, why_unusable
from fastvision._extension import has_kernel

Reason = str | None


def _never(*_args: Any) -> Reason:
    return None


@dataclass(frozen=True)
class OpCost:
    """The cost of one forward call: the minimal DRAM traffic (read every input and write every output
    once, in bytes) and the useful floating-point operations (0 for an op that only moves data)."""

    bytes_moved: int
    flops: int


@dataclass(frozen=True)
class AutogradRule:
    """Fake kernels and autograd shared by every backend whose ops have one schema.

    ``setup_context(ctx, inputs, output)`` saves what the backward needs; ``backward(ctx, backward_op,
    *grad_outputs)`` returns one gradient (or ``None``) per forward input, calling ``backward_op``;
    ``backward_reference`` is plain PyTorch with the backward op's signature and outputs (the
    oracle of the backward kernels, and the rule for higher-order gradients);
    ``backward_differentiable`` names the backward op's inputs (by position) that can carry a
    gradient.

    ``forward_check`` / ``backward_check`` validate the forward / backward op's own arguments, as a
    direct ``torch.ops.fastvision.<op>`` call passes them: everything whose wrongness could make a
    kernel read or write out of bounds (dtypes, ranks, shapes that must agree, the layout a kernel
    assumes, index ranges, integer sizes), raising ``TypeError``/``ValueError`` that names the
    argument (reuse the public check; helpers in ``fastvision/ops/_checks.py``). Every op launched
    from Python (:func:`triton_launch`) runs them before its kernels when called directly (the
    public op and autograd pass arguments already checked); C++ ops check in their entry
    points (``csrc/<op>_common.h``). ``tests/test_registered_ops.py`` calls every registered op with
    bad arguments and fails for a launch without them.
    """

    forward_fake: Callable[..., Any]
    backward_fake: Callable[..., Any]
    setup_context: Callable[..., None]
    backward: Callable[..., tuple]
    backward_reference: Callable[..., Any]
    backward_differentiable: tuple[int, ...]
    forward_check: Callable[..., None] | None = None
    backward_check: Callable[..., None] | None = None


@dataclass(frozen=True)
class KernelBackend:
    """One backend: ``torch.ops.fastvision.<forward>`` and ``<backward>``.

    ``call(forward_op, *args)`` runs the forward op on the op's checked arguments and returns the
    public result (default: ``forward_op(*args)``); ``supports(*args)`` returns why this backend
    cannot take these arguments, or ``None``; ``onnx()`` returns a function that writes the forward
    op in standard ONNX operators (onnxscript, imported only when exporting), or is ``None``.
    """

    forward: str
    backward: str
    autograd: AutogradRule
    supports: Callable[..., Reason] = _never
    call: Callable[..., Any] | None = None
    native: bool = False  # declared in csrc/ (present only when the extension is built)
    onnx: Callable[[], Callable[..., Any]] | None = None

    def forward_op(self):
        return getattr(torch.ops.fastvision, self.forward).default

    def backward_op(self):
        return getattr(torch.ops.fastvision, self.backward).default


@dataclass
class OpSpec:
    """The declaration of one op (see the module docstring).

    Args:
        name: the public name, ``fastvision.ops.<name>``.
        reference: the definition in plain PyTorch, taking the checked arguments.
        check: validates the public arguments; returns the checked argument tuple that the
            reference, ``supports`` and the backends' ``call`` take.
        device: the device that decides dispatch, from the checked arguments.
        kernels: backend name (``cpu``, ``cuda``, ``triton``, ``reference`` when the reference
            backend itself is a registered op pair, or a peer library's in ``PEER_BACKENDS``, run
            only when forced) -> :class:`KernelBackend`.
        gpu_order, cpu_order: backends tried first on CUDA / CPU tensors, fastest first; the
            reference comes last in both.
        reference_supports: limits of the plain reference (``None``: none).
        dtypes: the floating dtypes the op takes.
        triton_module, benchmark_module: dotted module names of its Triton kernels and benchmark
            cases (``None`` where there are none).
        reference_traceable: whether torch.compile / torch.export can trace the reference (an op
            whose reference cannot says so with a clear error).
        cost: ``cost(*checked) -> OpCost`` of one forward call on the checked arguments (the
            benchmark cases and the profiler read it; every op in ``OPS`` has one).
    """

    name: str
    reference: Callable[..., Any]
    check: Callable[..., tuple]
    device: Callable[..., torch.device]
    kernels: dict[str, KernelBackend] = field(default_factory=dict)
    gpu_order: tuple[str, ...] = ()
    cpu_order: tuple[str, ...] = ("cpu",)
    reference_supports: Callable[..., Reason] = _never
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    triton_module: str | None = None
    benchmark_module: str | None = None
    reference_traceable: bool = True
    cost: Callable[..., OpCost] | None = None
    _absent: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def backends(self) -> tuple[str, ...]:
        """Every backend the op has, built or not: ``reference`` first."""
        return ("reference", *(b for b in self.kernels if b != "reference"))

    def cost_of(self, *args: Any, **kwargs: Any) -> OpCost:
        """The :class:`OpCost` of one forward call on these public arguments (checked first)."""
        if self.cost is None:
            raise NotImplementedError(f"{self.name} declares no cost model (OpSpec.cost)")
        return self.cost(*self.check(*args, **kwargs))

    def built(self, backend: str) -> Reason:
        """Why ``backend`` is absent from this installation, or ``None`` when present."""
        return self._absent.get(backend)

    def _find_absent(self) -> dict[str, str]:
        # Read once: the extension's contents are fixed at import (and dynamo cannot trace the lookup).
        absent = {}
        for backend, kernel in self.kernels.items():
            dispatch_key = "CUDA" if backend == "cuda" else "CPU"
            if kernel.native and not has_kernel(kernel.forward, dispatch_key):
                absent[backend] = f"fastvision._C was built without the {backend} kernel of {self.name}"
        return absent

    def runnable(self, device: torch.device) -> tuple[str, ...]:
        """The backends built here that can run on tensors of ``device`` (input limits aside)."""
        return tuple(
            b for b in self.backends if why_unusable(b, device) is None and self.built(b) is None
        )

    def why_not(self, backend: str, args: tuple, device: torch.device, transform: str | None) -> Reason:
        """Why ``backend`` cannot run these checked arguments, or ``None``."""
        if backend != "reference":
            if backend not in self.kernels:
                return f"{self.name} has no {backend!r} backend (it has: {', '.join(self.backends)})"
            reason = why_unusable(backend, device) or self.built(backend)
            if reason is not None:
                return reason
        if transform is not None and backend != "reference":
            return f"{transform} runs through the reference backend only"
        if backend == "reference":
            return self.reference_supports(*args)
        return self.kernels[backend].supports(*args)

    def select(self, args: tuple) -> str:
        """The backend that runs these checked arguments (see the module docstring)."""
        return self._choose(args, active_transform(args))

    def _choose(self, args: tuple, transform: str | None) -> str:
        if _onnx_export[0]:
            return self.onnx_backend(args)
        device = self.device(*args)
        forced = forced_backend()
        if forced is not None:
            reason = self.why_not(forced, args, device, transform)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.name}: cannot use the forced {forced!r} backend: {reason}"
                )
            return forced
        if transform is None:
            order = self.gpu_order if device.type == "cuda" else self.cpu_order
            for backend in order:
                if self.why_not(backend, args, device, None) is None:
                    return backend
        reason = self.why_not("reference", args, device, transform)
        if reason is not None:
            raise BackendUnavailableError(f"{self.name}: no backend takes this input: {reason}")
        return "reference"

    def onnx_backend(self, args: tuple) -> str:
        """The backend traced for ONNX export: the first built one with a translation that takes
        these arguments (its node is only traced, never run, so the device does not matter), else
        the reference, whose plain-PyTorch lowering the exporter translates op by op."""
        for backend, kernel in self.kernels.items():
            if kernel.onnx is not None and self.built(backend) is None and kernel.supports(*args) is None:
                return backend
        return "reference"

    def run(self, backend: str, args: tuple, transform: str | None = None) -> Any:
        """Run ``backend`` on checked arguments (no selection, no checks); under a ``transform`` the
        plain reference runs, even where the reference backend is a registered op pair."""
        kernel = self.kernels.get(backend)
        if kernel is None or transform is not None:
            return self.reference(*args)
        op = kernel.forward_op()
        return _trusting(op, *args) if kernel.call is None else _trusting(kernel.call, op, *args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        checked = self.check(*args, **kwargs)
        transform = active_transform(checked)
        backend = self._choose(checked, transform)
        if _cost_records[0] is not None and transform is None and not torch.compiler.is_compiling():
            return self._run_recorded(_cost_records[0], backend, checked)
        return self.run(backend, checked, transform)

    def _run_recorded(self, records: list, backend: str, checked: tuple) -> Any:
        """:meth:`run` inside a ``fastvision.op.<name>`` profiler range, after appending
        ``(name, OpCost or None)`` to ``records`` (the cost is computed in a range of its own,
        ``fastvision.op_cost``, so that a profile can tell its time apart)."""
        cost = None
        if self.cost is not None:
            with torch.profiler.record_function("fastvision.op_cost"):
                cost = self.cost(*checked)
        records.append((self.name, cost))
        with torch.profiler.record_function(f"fastvision.op.{self.name}"):
            return self.run(backend, checked)


OPS: dict[str, OpSpec] = {}

# The per-call cost records while record_op_costs() is active, else None (a plain global: tracing
# reads it as a constant, so the off state adds nothing to a compiled graph).
_cost_records: list[list | None] = [None]


@contextlib.contextmanager
def record_op_costs():
    """Within: every eager op call appends ``(name, OpCost)`` to the yielded list and runs inside a
    ``torch.profiler.record_function("fastvision.op.<name>")`` range (``fastvision.profiling`` uses it).
    Calls traced by torch.compile / torch.export, or under a torch.func transform, are not recorded."""
    previous = _cost_records[0]
    records: list = []
    _cost_records[0] = records
    try:
        yield records
    finally:
        _cost_records[0] = previous


# True while fastvision.deploy exports to ONNX (a plain global, so tracing reads it).
_onnx_export: list[bool] = [False]


@contextlib.contextmanager
def onnx_export_dispatch():
    """Within: every op dispatches to :meth:`OpSpec.onnx_backend`, whatever backend is forced."""
    previous = _onnx_export[0]
    _onnx_export[0] = True
    try:
        yield
    finally:
        _onnx_export[0] = previous


def onnx_translation_table() -> dict:
    """Forward op overload -> its standard-ONNX translation, for every built backend that has one
    (the ``custom_translation_table`` of ``torch.onnx.export``)."""
    table = {}
    for spec in OPS.values():
        for backend, kernel in spec.kernels.items():
            if kernel.onnx is not None and spec.built(backend) is None:
                table[kernel.forward_op()] = kernel.onnx()
    return table


def define_op(spec: OpSpec) -> OpSpec:
    """Register ``spec``'s fake kernels and autograd for every backend and list it in ``OPS``.

    Returns the spec, which is callable as the op (checks, then dispatch). A backend declared in
    csrc/ gets its registration only when the extension holds its forward op.
    """
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is declared twice")
    unknown = set(spec.kernels) - {*BACKENDS, *PEER_BACKENDS}
    if unknown:
        raise ValueError(f"{spec.name}: unknown backends {sorted(unknown)}")
    for order in (spec.gpu_order, spec.cpu_order):
        missing = [b for b in order if b not in spec.kernels]
        if missing:
            raise ValueError(f"{spec.name}: backends {missing} are ordered but not declared")
        peers = [b for b in order if b in PEER_BACKENDS]
        if peers:
            raise ValueError(f"{spec.name}: peer backends {peers} run only when forced, never in an order")
    spec._absent = spec._find_absent()
    registered: set[str] = set()
    for kernel in spec.kernels.values():
        if kernel.forward in registered:
            continue
        if kernel.native and not _op_exists(kernel.forward):
            continue
        _register_kernel_pair(kernel)
        registered.add(kernel.forward)
    OPS[spec.name] = spec
    return spec


def _op_exists(name: str) -> bool:
    return has_kernel(name, "CPU") or has_kernel(name, "CUDA")


def _register_kernel_pair(kernel: KernelBackend) -> None:
    rule = kernel.autograd
    forward, backward = f"fastvision::{kernel.forward}", f"fastvision::{kernel.backward}"
    torch.library.register_fake(forward)(rule.forward_fake)
    torch.library.register_fake(backward)(rule.backward_fake)
    backward_op = kernel.backward_op()

    def forward_backward(ctx, *grad_outputs):
        return _trusting(rule.backward, ctx, backward_op, *grad_outputs)

    torch.library.register_autograd(forward, forward_backward, setup_context=rule.setup_context)
    _register_higher_order(backward, rule)
    if not kernel.native:
        _LAUNCH_CHECKS[kernel.forward] = rule.forward_check
        _LAUNCH_CHECKS[kernel.backward] = rule.backward_check


# The raw-op checks exist for direct torch.ops calls. Calls the contract makes itself (a public op's
# checked arguments, autograd's saved tensors) skip them: their index-range reads cost a host sync
# per call. Per thread, since autograd runs a CUDA backward on a thread of its own; under
# torch.compile the launches run checked (the compiled graph calls the ops directly).
_trusted = threading.local()


def _trusting(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the raw-op checks of the launches it makes skipped (on this thread)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    depth = getattr(_trusted, "depth", 0)
    _trusted.depth = depth + 1
    try:
        return fn(*args)
    finally:
        _trusted.depth = depth


# Launch name -> the raw-op check its AutogradRule declares (None: declared without one). Filled by
# define_op; read by every triton_launch op before it launches.
_LAUNCH_CHECKS: dict[str, Callable[..., None] | None] = {}


def launch_check(name: str) -> Callable[..., None] | None:
    """The argument check that the Python-launched op ``fastvision::<name>`` runs, or ``None``."""
    return _LAUNCH_CHECKS.get(name)


def _register_higher_order(backward: str, rule: AutogradRule) -> None:
    """The backward op's own autograd: differentiate ``rule.backward_reference`` (plain PyTorch)."""

    def setup_context(ctx, inputs, output):
        tensors = [(i, t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
        ctx.tensor_positions = [i for i, _ in tensors]
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.save_for_backward(*(t for _, t in tensors))

    def backward_fn(ctx, *grad_outputs):
        inputs = list(ctx.others)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors, strict=True):
            inputs[position] = tensor
        create_graph = torch.is_grad_enabled()
        wanted = [i for i in rule.backward_differentiable if ctx.needs_input_grad[i]]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            for i in wanted:
                inputs[i] = inputs[i].detach().requires_grad_(True)
            outputs = rule.backward_reference(*inputs)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            pairs = [
                (out, grad)
                for out, grad in zip(outputs, grad_outputs, strict=True)
                if grad is not None and out.requires_grad and out.numel() > 0
            ]
            if pairs:
                found = torch.autograd.grad(
                    [out for out, _ in pairs],
                    [inputs[i] for i in wanted],
                    [grad for _, grad in pairs],
                    allow_unused=True,
                    create_graph=create_graph,
                )
                for i, g in zip(wanted, found, strict=True):
                    grads[i] = g
        return tuple(grads)

    torch.library.register_autograd(backward, backward_fn, setup_context=setup_context)


# --- transforms that only the reference supports --------------------------------------------------


def _tensors(values: Sequence[Any]):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)
        elif hasattr(value, "__tensors__"):
            yield from value.__tensors__()


def active_transform(args: Sequence[Any]) -> str | None:
    """The autograd transform these arguments are under that kernels cannot serve, or ``None``.

    ``torch.func`` transforms (vmap, grad, jvp, jacrev, jacfwd, hessian) and forward-mode AD
    (``torch.autograd.forward_ad``) need rules that custom ops do not have; the reference, plain
    PyTorch, has them all.
    """
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (vmap/grad/jvp/jacrev/jacfwd/hessian)"
    if torch.autograd.forward_ad._current_level >= 0:
        for tensor in _tensors(args):
            if torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None:
                return "forward-mode AD (torch.autograd.forward_ad)"
    return None


# --- helpers for declaring ops ----------------------------------------------------------------------


def triton_launch(name: str, schema: str | None = None):
    """``torch.library.custom_op`` for a Triton launch, run under a device guard.

    A direct ``torch.ops.fastvision`` call first runs the raw-op check of its :class:`AutogradRule`
    (``forward_check`` or ``backward_check``, bound by :func:`define_op`), so that bad arguments get
    a clear error instead of an out-of-bounds kernel; the contract's own calls, already checked,
    skip it. The guard makes the
    launch use the inputs' device (and that device's current stream), so tensors on a second GPU
    work as on the first.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            check = _LAUNCH_CHECKS.get(name)
            if check is not None and not getattr(_trusted, "depth", 0):
                check(*args, **kwargs)
            device = next((t.device for t in _tensors(args) if t.device.type == "cuda"), None)
            if device is None:
                return fn(*args, **kwargs)
            with torch.cuda.device(device):
                return fn(*args, **kwargs)

        return torch.library.custom_op(f"fastvision::{name}", guarded, mutates_args=(), schema=schema)

    return wrap


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if autograd tracks it, else a detached copy that requires grad.

    Backward references differentiate their inputs: tracked inputs keep their graph (so a
    higher-order gradient flows through), untracked ones become leaves.
    """
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_(True)


def only_dtypes(backend: str, dtypes: tuple[torch.dtype, ...], index: int = 0) -> Callable[..., Reason]:
    """A ``supports`` that takes the listed dtypes of checked argument ``index``."""

    def supports(*args: Any) -> Reason:
        dtype = args[index].dtype
        if dtype in dtypes:
            return None
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"the {backend} backend takes dtypes ({names}), got {str(dtype).removeprefix('torch.')}"

    return supports


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with autocast off on its inputs' device: a reference that promises float32 math
    keeps it inside a caller's ``torch.autocast`` region (which would run its matmuls in bfloat16 or
    float16); traced by torch.compile and torch.export, and transparent to torch.func transforms."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        tensor = next(_tensors(args), None)
        device_type = "cpu" if tensor is None else tensor.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return run
