"""Backends: which can run here, and the forced choice.

Every op has some of four backends: ``reference`` (plain PyTorch), ``cpu`` (C++ kernel),
``triton`` and ``cuda`` (CUDA C++ kernel). By default CUDA tensors go to the op's fastest GPU
backend (the order each op declares, from measurement) and CPU tensors to the C++ kernel when it
is built, else to the reference. ``use_backend(name)`` forces one backend for every op, in the
calling thread or asyncio task only; an op that lacks it, or cannot run it on the given input,
raises :class:`BackendUnavailableError` instead of silently falling back. Under
``TRITON_INTERPRET=1`` the triton backend runs on CPU tensors. Dispatch itself is the op
contract's (``fastvision/ops/_contract.py``).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading

import torch

from fastvision._extension import extension_loaded, has_kernel

BACKENDS = ("reference", "cpu", "triton", "cuda")
# Backends that run a peer library's kernel, declared by the op that wraps it and never in an
# automatic order: forced by name like the others, unusable where the library does not import.
PEER_BACKENDS = ("mamba_ssm",)


class BackendUnavailableError(RuntimeError):
    """A forced backend is missing for an op, or cannot run on the given device."""


def _check_name(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS + PEER_BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + PEER_BACKENDS} or None, got {name!r}")
    return name


# The forced choice is thread- and task-local: a ContextVar, so that two threads (or two asyncio tasks)
# each in its own `with use_backend(...)` block keep their own choice, and a block's exit restores
# only its own context. The default, the same in every context, is FASTVISION_BACKEND.
_DEFAULT: str | None = _check_name(os.environ.get("FASTVISION_BACKEND") or None)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastvision_backend", default=_DEFAULT)
# The same choice per thread, read only while torch.compile traces on a torch whose dynamo cannot
# read a ContextVar (torch 2.11 refuses `ContextVar.get()` under fullgraph=True; 2.14 traces it and
# guards on its value). Within one thread it follows the last block entered or left.
_per_thread = threading.local()


def _dynamo_reads_contextvars() -> bool:
    # Evaluated while tracing only, when torch._dynamo is loaded (importing it eagerly costs seconds).
    return hasattr(sys.modules.get("torch._dynamo.source"), "ContextVarGetSource")


def _set(name: str | None) -> contextvars.Token:
    _per_thread.name = name
    return _forced.set(name)


class use_backend:  # noqa: N801  (reads as a function: `use_backend("triton")`)
    """Force ``name`` for every op (``None`` restores automatic choice) in the calling thread or
    asyncio task; other threads and tasks keep their own choice.

    Takes effect at once; used as a context manager, the previous choice comes back on exit::

        fastvision.use_backend("triton")          # this thread / task, until changed
        with fastvision.use_backend("reference"):  # scoped
            ...

    A new thread starts from the process default, ``FASTVISION_BACKEND`` (automatic when unset);
    an asyncio task starts from the choice of the code that created it.
    """

    def __init__(self, name: str | None):
        name = _check_name(name)
        self._previous = _forced.get()
        self._token = _set(name)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            _forced.reset(self._token)
        except ValueError:  # left in another context than entered: restore the value instead
            _forced.set(self._previous)
        _per_thread.name = self._previous


def forced_backend() -> str | None:
    """The backend forced in the calling thread / task, or ``None`` for automatic choice."""
    if torch.compiler.is_compiling() and not _dynamo_reads_contextvars():
        return getattr(_per_thread, "name", _DEFAULT)
    return _forced.get()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure means "no triton")
        return False
    return True


_TRITON_IMPORTABLE = _import_triton()


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


# Fixed once the extension is loaded: read at import, not on every op call.
_CUDA_KERNELS_BUILT = has_kernel("geglu_forward", "CUDA")


def cuda_kernels_built() -> bool:
    return _CUDA_KERNELS_BUILT


def available_backends() -> dict[str, bool]:
    """Which backends can run on this machine (for some device it has)."""
    gpu = torch.cuda.is_available()
    return {
        "reference": True,
        "cpu": extension_loaded(),
        "triton": triton_importable() and (gpu or triton_interpreting()),
        "cuda": cuda_kernels_built() and gpu,
    }


def why_unusable(backend: str, device: torch.device) -> str | None:
    """``None`` when ``backend`` can run on tensors of ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
        return None if extension_loaded() else "the C++ extension fastvision._C is not built"
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (CPU ones with TRITON_INTERPRET=1), got a {device.type} tensor"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return None if cuda_kernels_built() else "fastvision._C was built without CUDA kernels"
    if backend == "mamba_ssm":
        missing = mamba_ssm_missing()
        if missing is not None:
            return missing
        if device.type != "cuda":
            return f"the mamba_ssm backend runs on CUDA tensors, got a {device.type} tensor"
        return None
    raise ValueError(f"unknown backend {backend!r}")


_MAMBA_SSM_MISSING: list[str | None] = []


def mamba_ssm_missing() -> str | None:
    """Why mamba-ssm's ``selective_scan_fn`` cannot run here (not installed, or its CUDA extension
    ``selective_scan_cuda`` absent), or ``None``; imported on first use, the answer kept."""
    if not _MAMBA_SSM_MISSING:
        reason = None
        try:
            from mamba_ssm.ops import selective_scan_interface
        except Exception as error:  # noqa: BLE001  (any import failure means "not usable")
            reason = f"mamba-ssm is not installed or does not import ({type(error).__name__}: {error})"
        else:
            if getattr(selective_scan_interface, "selective_scan_cuda", True) is None:
                reason = "mamba-ssm is installed without its CUDA extension selective_scan_cuda"
        _MAMBA_SSM_MISSING.append(reason)
    return _MAMBA_SSM_MISSING[0]
