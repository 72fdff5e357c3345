"""Backends: which can run here, and the forced choice.

Every op has some of four backends: ``reference`` (plain PyTorch), ``cpu`` (C++ kernel),
``triton`` and ``cuda`` (CUDA C++ kernel). By default CUDA tensors go to the op's fastest GPU
backend (the order each op declares, from measurement) and CPU tensors to the C++ kernel when it
is built, else to the reference. ``use_backend(name)`` forces one backend for every op; an op that
lacks it, or cannot run it on the given input, raises :class:`BackendUnavailableError` instead
of silently falling back. Under ``TRITON_INTERPRET=1`` the triton backend runs on CPU tensors.
Dispatch itself is the op contract's (``fastvision/ops/_contract.py``).
"""

from __future__ import annotations

import os

import torch

from fastvision._extension import extension_loaded, has_kernel

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A forced backend is missing for an op, or cannot run on the given device."""


def _check_name(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


# A plain module global (not a ContextVar) so that torch.compile traces through it.
_forced: list[str | None] = [_check_name(os.environ.get("FASTVISION_BACKEND") or None)]


class use_backend:  # noqa: N801  (reads as a function: `use_backend("triton")`)
    """Force ``name`` for every op (``None`` restores automatic choice).

    Takes effect at once; used as a context manager, the previous choice comes back on exit::

        fastvision.use_backend("triton")          # global
        with fastvision.use_backend("reference"):  # scoped
            ...
    """

    def __init__(self, name: str | None):
        self._previous = _forced[0]
        _forced[0] = _check_name(name)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc_info) -> None:
        _forced[0] = self._previous


def forced_backend() -> str | None:
    return _forced[0]


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
    raise ValueError(f"unknown backend {backend!r}")
